"""Manifest v2: every variant a described artifact, the JSON Schema, version-1 builds, contracts at load."""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from omniforge.errors import EngineError, InputError, ManifestError
from omniforge.pipeline.contracts import Contract, Role, Slot, llm_inplace_contract
from omniforge.pipeline.manifest import (
    Manifest,
    collect_artifacts,
    load_manifest,
    schema_path,
    validate_schema,
    write_manifest,
)
from omniforge.runtime.build import Build
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig

DATA = Path(__file__).parent / "data"
PACKAGE = Path(__file__).resolve().parents[1] / "omniforge"


def schema_errors(data: dict) -> list[str]:
    schema = json.loads(schema_path().read_text())
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]


def test_shipped_schema_is_valid_and_accepts_a_written_build(default_build):
    jsonschema.Draft202012Validator.check_schema(json.loads(schema_path().read_text()))
    data = json.loads((default_build / "manifest.json").read_text())
    assert data["schema_version"] == 2
    assert schema_errors(data) == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["artifacts"].append({"path": "../outside", "sha256": "0" * 64, "size": 1}),
        lambda d: d["artifacts"].append({"path": "a\x00b", "sha256": "0" * 64, "size": 1}),
        lambda d: d["artifacts"].append({"path": "x" * 5000, "sha256": "0" * 64, "size": 1}),
        lambda d: d["stages"]["llm"]["variants"].append(dict(d["stages"]["llm"]["variants"][0])),
        lambda d: d["stages"]["llm"]["variants"][1].update(role="fastest"),
        lambda d: d["stages"]["llm"]["variants"][1]["contract"]["inputs"][0].update(dtype="complex"),
        lambda d: d["stages"]["llm"].update(variants={"onnxruntime": "stages/llm.ort.onnx"}),
        lambda d: d.update(schema_version=1),
    ],
)
def test_schema_refuses_broken_manifests(default_build, edit):
    data = json.loads((default_build / "manifest.json").read_text())
    edit(data)
    assert schema_errors(data)
    with pytest.raises(ManifestError):
        validate_schema(data)


def test_every_variant_has_a_role_a_precision_and_a_contract(default_build):
    m = load_manifest(default_build)
    for name, sb in m.stages.items():
        roles = [v.role for v in sb.variants]
        assert roles.count(Role.CANONICAL) == 1 and len(set(roles)) == len(roles)
        for v in sb.variants:
            c = m.contract(name, v)
            assert c.input_names and c.output_names
            if v.contract is None:  # shares the stage's contract
                assert c.input_names == m.pipeline.stage(name).input_names
    llm = m.variant("llm", Role.ORT_INPLACE_LLM)
    geometry = m.pipeline.stage("llm").llm
    assert llm.contract == llm_inplace_contract(geometry)
    assert len(llm.contract.inplace) == 2 * geometry.num_layers
    assert set(llm.contract.slots) == {str(s) for s in Slot}
    # every tap names a tensor or initializer that exists in the graph
    graph = onnx.load(str(default_build / llm.file)).graph
    names = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    assert set(llm.contract.taps.values()) <= names


def test_runtime_binds_from_the_contract_in_the_manifest(default_build):
    rt = LlmRuntime(default_build, num_slots=1)
    assert rt.engine.contract == load_manifest(default_build).variant("llm", Role.ORT_INPLACE_LLM).contract
    inputs = [i.name for i in rt.engine.session.get_inputs()]
    assert inputs == rt.engine.contract.input_names


def test_llm_rows_are_checked_against_the_contract(default_build):
    rt = LlmRuntime(default_build, num_slots=2)
    h = rt.geometry.hidden_size
    slot = rt.pool.allocate(1)
    try:
        binding = rt.engine.bind(rt.pool, slot)
        bad = [
            np.zeros((1, 3, h), np.float64),  # dtype
            np.zeros((1, 3, h + 1), np.float32),  # width
            np.zeros((2, 3, h), np.float32),  # batch of another slot count
            np.zeros((3, h), np.float32),  # rank
            np.full((1, 3, h), np.nan, np.float32),
        ]
        for rows in bad:
            with pytest.raises(InputError):
                binding.step(rows)
        assert rt.pool.lengths[slot.start] == 0  # nothing was written
    finally:
        rt.pool.release(slot)


def _downgrade_to_v1(build: Path) -> None:
    """Rewrite a build's manifest in the version-1 layout of the previous release."""
    path = build / "manifest.json"
    d = json.loads(path.read_text())
    keys = {"ort": "onnxruntime", "ort_inplace_llm": "onnxruntime", "qdq": "qdq", "weight_only_dq": "qdq"}
    for name, sb in d["stages"].items():
        canonical = next(v for v in sb["variants"] if v["role"] == "canonical")
        d["stages"][name] = {
            "file": canonical["file"],
            "data_files": canonical["data_files"],
            "precision": sb["precision"],
            "exporter": sb["exporter"],
            "opset": sb["opset"],
            "nodes": sb["nodes"],
            "variants": {keys[v["role"]]: v["file"] for v in sb["variants"] if v["role"] in keys},
        }
    d["schema_version"] = 1
    path.write_text(json.dumps(d))


def test_version_1_builds_still_run_and_are_never_rewritten(default_build, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(default_build, old)
    _downgrade_to_v1(old)
    before = (old / "manifest.json").read_bytes()
    m = load_manifest(old)
    assert m.read_version == 1 and m.schema_version == 2
    assert m.to_dict()["stages"] == load_manifest(default_build).to_dict()["stages"]
    cfg = GenerationConfig(max_new_tokens=12)
    assert (
        LlmRuntime(old, num_slots=1).generate("A dog runs", cfg).token_ids
        == LlmRuntime(default_build, num_slots=1).generate("A dog runs", cfg).token_ids
    )
    assert (old / "manifest.json").read_bytes() == before


def test_the_previous_release_int4_manifest_upgrades():
    """The manifest of an INT4 build written by the previous release (version 1)."""
    m = Manifest.from_dict(json.loads((DATA / "manifest_v1_int4.json").read_text()))
    assert m.read_version == 1
    llm = m.stages["llm"]
    assert llm.precision == "int4"
    assert {v.role for v in llm.variants} == {Role.CANONICAL, Role.ORT_INPLACE_LLM, Role.WEIGHT_ONLY_DQ}
    assert llm.variant(Role.ORT_INPLACE_LLM).contract == llm_inplace_contract(m.pipeline.stage("llm").llm)
    assert llm.canonical.precision == "fp32" and llm.variant(Role.WEIGHT_ONLY_DQ).precision == "int4"
    unet = m.stages["image_unet"]
    assert unet.variant(Role.QDQ).file == unet.variant(Role.ORT).file  # static INT8 serves its Q/DQ graph
    assert (
        schema_errors(json.loads(json.dumps(m.to_dict()))) == []
    )  # upgraded in memory, it is a valid version-2 manifest


def _identity_graph(contract: Contract, out_name: str) -> onnx.ModelProto:
    """A graph with the stage's input that returns it unchanged under the stage's output name."""
    t = contract.inputs[0]
    shape = [d if isinstance(d, int) else d for d in t.shape]
    x = helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Identity", [t.name], [out_name])], "swap", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_swapped_for_another_is_refused_at_load(default_build, tmp_path):
    """An Identity graph in place of the VAE decoder, hashes recomputed: its output has the wrong
    name or rank for the stage, so the engine refuses it before any run."""
    b = tmp_path / "swapped"
    shutil.copytree(default_build, b)
    m = load_manifest(b)
    name = "image_vae_decoder"
    served = m.stage_build(name).served()
    spec = m.pipeline.stage(name)
    for out_name in ("whatever", spec.output_names[0]):  # wrong name, then right name but wrong rank
        onnx.save_model(_identity_graph(Contract.of_stage(spec), out_name), str(b / served.file))
        swapped = dict(m.artifacts, **collect_artifacts(b, [served.file]))
        write_manifest(b, Manifest(m.pipeline, m.stages, swapped, m.files, m.source, m.tools))
        with pytest.raises(EngineError, match=name):
            Build(b).engine(name)


LLM_TENSOR = re.compile(
    r"^(inputs_embeds|seqlens_k|total_sequence_length|logits|hidden_states|attention_mask|position_ids"
    r"|past_key_values\..*|present\..*|layers\.\d*\.?(norm1|norm2|act|qkv\.weight).*)$"
)
# the in-place contract's definition, the lowering that writes it, and the canonical LLM stage's
# own description and export wrapper
ALLOWED = {"pipeline/contracts.py", "export/llm_ort.py", "pipeline/describe.py", "export/llm.py"}


def test_no_module_spells_the_llm_graphs_tensor_names():
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and LLM_TENSOR.match(node.value)
            ):
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.JoinedStr):  # f"past_key_values.{i}.key" and the like
                head = node.values[0] if node.values else None
                if isinstance(head, ast.Constant) and re.match(
                    r"(past_key_values|present|layers)\.", head.value
                ):
                    offenders.append(f"{rel}:{node.lineno} f-string {head.value!r}")
    assert offenders == []


def test_inspect_lists_the_variant_each_stage_is_served_from(default_build, capsys):
    from omniforge.cli import main

    assert main(["inspect", str(default_build)]) == 0
    out = capsys.readouterr().out
    llm_line = next(line for line in out.splitlines() if line.strip().startswith("llm "))
    served = load_manifest(default_build).variant("llm", Role.ORT_INPLACE_LLM)
    assert "ort_inplace_llm" in llm_line and served.file in llm_line


def _rehash(b: Path, m: Manifest, rels: list[str], stages=None) -> Manifest:
    new = Manifest(
        m.pipeline,
        stages or m.stages,
        dict(m.artifacts, **collect_artifacts(b, rels)),
        m.files,
        m.source,
        m.tools,
    )
    write_manifest(b, new)
    return new


def test_a_file_replaced_after_opening_is_never_used(default_build, tmp_path):
    b = tmp_path / "replaced"
    shutil.copytree(default_build, b)
    build = Build(b)  # every artifact verified here
    served = build.manifest.stage_build("image_vae_decoder").served()
    other = build.manifest.stage_build("audio_vae_decoder").served()
    (b / served.file).write_bytes((b / other.file).read_bytes())  # same contract, other weights
    with pytest.raises(ManifestError, match="SHA-256"):
        build.engine("image_vae_decoder")


def test_external_data_must_be_listed_and_hashed(default_build, tmp_path):
    b = tmp_path / "external"
    shutil.copytree(default_build, b)
    m = load_manifest(b)
    name = "input_projector"
    sb = m.stage_build(name)
    served = sb.served()
    data_rel = served.file + ".data"
    model = onnx.load(str(b / served.file))
    onnx.save_model(
        model,
        str(b / served.file),
        save_as_external_data=True,
        location=Path(data_rel).name,
        size_threshold=0,
    )
    m = _rehash(b, m, [served.file])  # the graph re-hashed, its data file not listed
    with pytest.raises(ManifestError, match="does not list"):
        Build(b).engine(name)
    from omniforge.cli import main

    assert main(["inspect", str(b)]) == 1
    listed = sb.with_variant(replace(served, data_files=(data_rel,)))
    _rehash(b, m, [served.file, data_rel], {**m.stages, name: listed})
    feeds = m.pipeline.stage(name).sample_inputs()
    assert np.allclose(
        Build(b).engine(name).run(feeds)["embeds"], Build(default_build).engine(name).run(feeds)["embeds"]
    )
    (b / data_rel).write_bytes(b"\0" * (b / data_rel).stat().st_size)  # edited after it was listed
    with pytest.raises(ManifestError, match="SHA-256"):
        Build(b, verify=False).engine(name)


def test_inplace_llm_parity_reaches_the_full_context(default_build):
    report = json.loads((default_build / "parity.json").read_text())
    llm = next(r for r in report if r["stage"] == "llm")
    inplace = [p for p in llm["parity"] if p["stage"].endswith("[onnxruntime]")]
    g = load_manifest(default_build).pipeline.stage("llm").llm
    assert max(p["point"]["past"] + p["point"]["seq"] for p in inplace) == g.max_context
    assert all(p["passed"] for p in inplace)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than any parser's stack
        '{"schema_version": 2, "n": ' + "9" * 5000 + "}",  # a number with 5,000 digits
        "[]",  # a list where an object belongs
    ],
)
def test_hostile_manifest_text_is_one_error(default_build, tmp_path, text):
    b = tmp_path / "hostile"
    shutil.copytree(default_build, b)
    (b / "manifest.json").write_text(text)
    with pytest.raises(ManifestError):
        load_manifest(b, verify=False)


def test_a_manifest_that_breaks_the_schema_is_refused_on_reading(default_build, tmp_path):
    b = tmp_path / "nul"
    shutil.copytree(default_build, b)
    d = json.loads((b / "manifest.json").read_text())
    d["files"]["tokenizer"] = "llm/\x00tokenizer.json"
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="schema"):
        load_manifest(b, verify=False)
