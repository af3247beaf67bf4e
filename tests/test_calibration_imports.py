"""The calibration modules are leaves: no import cycle among them, and the integer codes need numpy only."""

import ast
import subprocess
import sys
from pathlib import Path

import omniforge.calibration

PACKAGE = Path(omniforge.calibration.__file__).parent
PREFIX = "omniforge.calibration."


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "omniforge.calibration":
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {
        name: {m.removeprefix(PREFIX) for m in _imports(p) if m.startswith(PREFIX)} & set(modules)
        for name, p in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a path, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return []


def test_no_import_cycle_inside_calibration():
    graph = _graph()
    assert {"codes", "awq", "gptq", "standard_form", "smoothquant", "tensors"} <= set(graph)
    assert _cycle(graph) == []
    for method in (
        "awq",
        "gptq",
        "smoothquant",
        "standard_form",
    ):  # the methods use codes/tensors, not each other
        assert not graph[method] & {"awq", "gptq", "smoothquant", "standard_form"}, method
    # the walk finds cycles: one made up on purpose is reported
    assert _cycle({**graph, "codes": {"awq"}}) != []


def test_codes_imports_only_numpy():
    top = {m.split(".")[0] for m in _imports(PACKAGE / "codes.py")}
    assert top <= {"__future__", "typing", "numpy"}, top
    code = (
        "import sys, omniforge.calibration.codes; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_calibration_module_imports_alone():
    for name in sorted(_graph()):
        code = f"import importlib, sys; importlib.import_module('{PREFIX}{name}')"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr[-500:])
