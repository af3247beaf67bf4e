"""The native core (``native/``, libomniforge): built with CMake, its C++ and C test programs run
against the default build, its greedy tokens compared with the Python runtime's, and the same
programs run under AddressSanitizer + UndefinedBehaviorSanitizer with leak checking.

The CMake build folders are cached under pytest's cache, keyed by the hash of the native sources,
so an unchanged tree is built once; ONNX Runtime's headers (Debian 13's libonnxruntime-dev) are
fetched once into the same cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import locked as _locked  # parallel test processes share the cached build

# the native core runs the base LLM: switchable LoRA adapters are bound by the Python runtime only
BASE = "none"

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
FETCH_HEADERS = ROOT / "scripts" / "fetch_ort_headers.sh"
SOURCES = ("CMakeLists.txt", "include", "src", "tests")


EXAMPLES = (ROOT / "examples" / "c", ROOT / "examples" / "cpp")


def _sources_key(kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    tops = [NATIVE / top for top in SOURCES] + list(EXAMPLES)
    files = [FETCH_HEADERS] + sorted(
        p for top in tops for p in ([top] if top.is_file() else top.rglob("*")) if p.is_file()
    )
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def native_cache(request: pytest.FixtureRequest) -> Path:
    missing = [t for t in ("cmake", "g++", "gcc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the native core needs {' and '.join(missing)}, which this machine does not have")
    return Path(request.config.cache.mkdir("omniforge-native"))


@pytest.fixture(scope="session")
def ort_headers(native_cache: Path) -> Path:
    dest = native_cache / "ort-headers"
    with _locked(native_cache / "headers.lock"):
        r = _run(["sh", str(FETCH_HEADERS), str(dest)])
    assert r.returncode == 0, r.stderr.strip()
    return dest / "include"


@pytest.fixture(scope="session")
def ort_library() -> str:
    import onnxruntime

    return os.path.dirname(onnxruntime.__file__)


BUILD_KINDS = {  # kind: (CMake options, build type, targets; None: all)
    "rel": (["-DOMNIFORGE_SANITIZE=OFF"], "RelWithDebInfo", None),
    "san": (["-DOMNIFORGE_SANITIZE=ON", "-DOMNIFORGE_EXAMPLES=OFF"], "Debug", None),
    "tsan": (["-DOMNIFORGE_TSAN=ON"], "Debug", ["omniforge_threads"]),
}


def _build(cache: Path, headers: Path, kind: str) -> Path:
    options, build_type, targets = BUILD_KINDS[kind]
    out = cache / f"build-{kind}-{_sources_key(kind)}"
    with _locked(cache / f"build-{kind}.lock"):
        if (out / ".complete").exists():
            return out
        for old in cache.glob(f"build-{kind}-*"):  # builds of older sources
            shutil.rmtree(old, ignore_errors=True)
        configure = [
            "cmake",
            "-S",
            str(NATIVE),
            "-B",
            str(out),
            f"-DOMNIFORGE_ORT_HEADERS={headers}",
            *options,
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        r = _run(configure)
        assert r.returncode == 0, f"cmake configure failed: {r.stderr.strip()[-2000:]}"
        r = _run(["cmake", "--build", str(out), "-j2", *(["--target", *targets] if targets else [])])
        assert r.returncode == 0, f"cmake build failed: {(r.stdout + r.stderr)[-4000:]}"
        (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def native_build(native_cache: Path, ort_headers: Path) -> Path:
    return _build(native_cache, ort_headers, "rel")


@pytest.fixture(scope="session")
def native_san_build(native_cache: Path, ort_headers: Path) -> Path:
    return _build(native_cache, ort_headers, "san")


@pytest.fixture(scope="session")
def native_tsan_build(native_cache: Path, ort_headers: Path) -> Path:
    return _build(native_cache, ort_headers, "tsan")


def _env(build: Path, ort_library: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMNIFORGE_TEST_BUILD": str(build), "OMNIFORGE_ORT_LIBRARY": ort_library, **extra}


SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

PROMPTS = [[1, 5, 9, 3, 7], [42], list(range(3, 60, 2))]


def _native_greedy(
    native: Path, build: Path, ids: list[int], env: dict[str, str], max_new: int = 32
) -> list[int]:
    r = _run([str(native / "omniforge_greedy_c"), str(build), str(max_new), *map(str, ids)], env=env)
    assert r.returncode == 0, r.stderr.strip()[-3000:]
    return [int(t) for t in r.stdout.split()]


def test_ctest_passes(native_build: Path, default_build: Path, ort_library: str) -> None:
    r = _run(
        ["ctest", "--test-dir", str(native_build), "--output-on-failure", "-V"],
        env=_env(default_build, ort_library),
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "all native checks passed" in r.stdout
    assert "Skipped" not in r.stdout  # ctest marks SKIP_RETURN_CODE runs so


def test_greedy_tokens_equal_the_python_runtime(
    native_build: Path, default_build: Path, ort_library: str
) -> None:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    rt = LlmRuntime(default_build)
    for ids in PROMPTS:
        want = rt.generate(
            ids, GenerationConfig(max_new_tokens=32, stop_token_ids=()), adapter=BASE
        ).token_ids
        got = _native_greedy(native_build, default_build, ids, _env(default_build, ort_library))
        assert got == want, f"prompt {ids}: native {got} != python {want}"


def _with_embedding(default_build: Path, out: Path, form: str) -> Path:
    """A copy of the default build whose token_embedding stage serves an ``ort`` variant of ``form``:
    ``int8`` (the quantizer's Gather/Cast/Gather/Mul graph) or ``other`` (Gather then Identity, a
    form neither runtime reads as a table)."""
    import json

    import onnx
    from onnx import helper

    shutil.copytree(default_build, out)
    model = onnx.load(str(out / "stages" / "token_embedding.onnx"))
    if form == "int8":
        from omniforge.calibration.weight_only import quantize_embedding

        model = quantize_embedding(model)
    else:
        node = model.graph.node[0]
        final = node.output[0]
        node.output[0] = "gathered"
        model.graph.node.append(helper.make_node("Identity", ["gathered"], [final]))
    rel = f"stages/token_embedding.{form}.onnx"
    data = model.SerializeToString()
    (out / rel).write_bytes(data)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["token_embedding"]["variants"].append(
        {
            "role": "ort",
            "file": rel,
            "precision": "int8" if form == "int8" else "fp32",
            "data_files": [],
            "contract": "stage",
        }
    )
    manifest["artifacts"].append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.mark.parametrize("form, native_form", [("int8", "table_int8"), ("other", "session")])
def test_greedy_tokens_equal_with_each_embedding_form(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path, form: str, native_form: str
) -> None:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    build = _with_embedding(default_build, tmp_path / form, form)
    rt = LlmRuntime(build)
    assert (rt.table is None) == (form == "other") and (rt.table is None or rt.table.scale is not None)
    ids = PROMPTS[2]
    want = rt.generate(ids, GenerationConfig(max_new_tokens=32, stop_token_ids=()), adapter=BASE).token_ids
    env = _env(build, ort_library)
    r = _run([str(native_build / "omniforge_greedy_c"), str(build), "32", *map(str, ids)], env=env)
    assert r.returncode == 0, r.stderr
    assert f"embedding: {native_form}" in r.stderr
    assert [int(t) for t in r.stdout.split()] == want


def test_c_program_reports_a_bad_build_in_one_sentence(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(default_build, bad)
    graph = bad / "stages" / "llm.ort.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x10
    graph.write_bytes(bytes(data))
    r = _run([str(native_build / "omniforge_greedy_c"), str(bad), "4", "1", "2"], env=_env(bad, ort_library))
    assert r.returncode == 1
    line = r.stderr.strip()
    assert line.count("\n") == 0
    assert line == (
        "OF_ERR_MANIFEST: artifact 'stages/llm.ort.onnx' does not match its SHA-256 in the manifest "
        "(corrupted or modified)"
    )


def test_under_address_and_undefined_behaviour_sanitizers(
    native_san_build: Path, default_build: Path, ort_library: str, tmp_path: Path
) -> None:
    env = _env(default_build, ort_library, **SANITIZER_ENV)
    r = _run([str(native_san_build / "omniforge_test")], env=env)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-6000:]
    assert "all native checks passed" in r.stdout
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    ids = PROMPTS[0]
    for build in (default_build, _with_embedding(default_build, tmp_path / "int8", "int8")):
        config = GenerationConfig(max_new_tokens=32, stop_token_ids=())
        want = LlmRuntime(build).generate(ids, config, adapter=BASE).token_ids
        r = _run([str(native_san_build / "omniforge_greedy_c"), str(build), "32", *map(str, ids)], env=env)
        assert r.returncode == 0, r.stderr[-6000:]
        assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
        assert [int(t) for t in r.stdout.split()] == want
    # text in, sampled, streamed and cut at a stop string: the tokenizer and sampler under ASan too
    prompt = "naïve café — 東京 \U0001f600 [IMG0] <image>"
    cfg = GenerationConfig(
        max_new_tokens=40, temperature=1.1, top_k=50, top_p=0.9, seed=4, stop_strings=("e ",)
    )
    want = LlmRuntime(default_build).generate(prompt, cfg, adapter=BASE)
    args = ["--text", prompt, "--max", "40", "--temperature", "1.1", "--top-k", "50", "--top-p", "0.9"]
    r = _run(
        [
            str(native_san_build / "omniforge_generate"),
            str(default_build),
            *args,
            "--seed",
            "4",
            "--stop-string",
            "e ",
        ],
        env=env,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
    import json

    got = json.loads(r.stdout)
    assert (
        got["tokens"] == want.token_ids and got["text"] == want.text and got["finish"] == want.finish_reason
    )


def test_c_example_streams_the_python_runtimes_reply(
    native_build: Path, default_build: Path, ort_library: str
) -> None:
    """examples/c/stream.c: a text prompt in, the reply streamed to stdout (greedy, the model's EOS
    as the stop token), as the Python runtime streams it."""
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    prompt = "Describe a harbour at dawn."
    want = LlmRuntime(default_build).generate(prompt, GenerationConfig(max_new_tokens=40), adapter=BASE)
    r = subprocess.run(
        [str(native_build / "omniforge_example_c"), str(default_build), prompt, "40"],
        capture_output=True,
        env=_env(default_build, ort_library),
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert r.stdout.decode() == want.text + "\n"
    assert r.stderr.decode().strip() == f"finish: {want.finish_reason}, {len(want.token_ids)} tokens"


def test_cpp_example_serves_cancels_and_reports_timing(
    native_build: Path, default_build: Path, ort_library: str
) -> None:
    """examples/cpp/service.cpp: one loaded build, 3 concurrent requests cancelled after 5 tokens,
    a timing line per request."""
    r = _run(
        [
            str(native_build / "omniforge_example_cpp"),
            str(default_build),
            "Hello there",
            "--max",
            "40",
            "--cancel-after",
            "5",
            "--requests",
            "3",
        ],
        env=_env(default_build, ort_library),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("request ")]
    assert len(lines) == 3 and r.stderr.startswith("loaded in ")
    for k, line in enumerate(lines):
        assert line.startswith(f"request {k}: tokens=5 finish=cancelled ttft_ms="), line
        assert "decode_tok_s=" in line


def test_cpp_any_to_any_example_writes_the_image_and_wav(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path
) -> None:
    """examples/cpp/any_to_any.cpp: an image in (a PPM file's pixels), the reply streamed (the
    Python pipeline's text), and the forced image and audio written as PPM and WAV of the decoders'
    sizes."""
    import wave

    import numpy as np
    from PIL import Image

    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    pipe = Pipeline(default_build)
    pic = np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    ppm = tmp_path / "in.ppm"
    Image.fromarray(pic).save(ppm, format="PPM")
    prompt = "Describe it and draw it"
    want = pipe.run(
        prompt,
        image=pic,
        generation=GenerationConfig(max_new_tokens=16),
        diffusion=DiffusionConfig(steps=2),
        force=["image", "audio"],
        adapter=BASE,
    )
    cmd = [
        str(native_build / "omniforge_example_any"),
        str(default_build),
        prompt,
        "--image",
        str(ppm),
    ]
    cmd += [
        "--force",
        "image,audio",
        "--image-out",
        str(tmp_path / "out.ppm"),
        "--audio-out",
        str(tmp_path / "out.wav"),
    ]
    cmd += ["--max", "16", "--steps", "2"]
    r = _run(cmd, env=_env(default_build, ort_library))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == want.text + "\n"
    h, w, _ = want.images[0].shape
    assert (tmp_path / "out.ppm").read_bytes().startswith(f"P6\n{w} {h}\n255\n".encode())
    assert (tmp_path / "out.ppm").stat().st_size == len(f"P6\n{w} {h}\n255\n") + h * w * 3
    with wave.open(str(tmp_path / "out.wav")) as f:
        assert (f.getframerate(), f.getnframes()) == (want.sample_rate, len(want.audios[0]))
    assert f"tokens={len(want.generation.token_ids)} finish=" in r.stderr


@pytest.mark.parametrize(
    "flag, package",
    [
        ("-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON", "nlohmann-json3-dev"),
        ("-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON", "libssl-dev"),
        ("-DFFTW3_INCLUDE_DIR=/nonexistent", "libfftw3-dev"),
    ],
)
def test_a_missing_package_is_named_in_one_sentence(
    native_cache: Path, ort_headers: Path, tmp_path: Path, flag: str, package: str
) -> None:
    r = _run(
        [
            "cmake",
            "-S",
            str(NATIVE),
            "-B",
            str(tmp_path / "b"),
            f"-DOMNIFORGE_ORT_HEADERS={ort_headers}",
            flag,
        ]
    )
    assert r.returncode != 0
    assert f"install Debian's {package}" in " ".join(r.stderr.split())
