# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The memory plan: its policy on a hand-built manifest, its refusals, the CLI, and its prediction
against the peak RSS of real requests on the default build."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniforge.bench.peak import measure_requests
from omniforge.errors import ConfigError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import Artifact, Manifest, StageBuild, Variant, load_manifest
from omniforge.pipeline.spec import Dim, LlmGeometry, PipelineSpec, StageKind, StageSpec, TensorSpec
from omniforge.runtime.native import find_library
from omniforge.runtime.plan import (
    KiB,
    MiB,
    kv_pool_bytes,
    native_decoding,
    parse_memory,
    plan_memory,
    request_stages,
    servable,
    stage_memory,
)
from tests.test_native import (  # noqa: F401  (fixtures)
    native_build,
    native_cache,
    ort_headers,
)

# ---- a hand-built manifest: stage sizes chosen here, no graphs needed -----------------------


def _t(name: str, *shape: int | str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def _stage(name: str, kind: StageKind, ins: list[TensorSpec], outs: list[TensorSpec], dims=(), **kw):
    return StageSpec(name, kind, name, tuple(ins), tuple(outs), tuple(dims), **kw)


BATCH = Dim("batch", 1, 1, 8)
GEOMETRY = LlmGeometry(
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=100, max_context=128
)


def hand_manifest(weights: dict[str, int], embedded: bool = False) -> Manifest:
    """A text + image-in + audio-in + text-to-image pipeline whose served graphs have ``weights``:
    in an external data file beside a 64 KiB graph (``embedded``: in the graph file itself)."""
    llm_dims = (
        BATCH,
        Dim("seq", 1, 8, 128),
        Dim("past", 0, 8, 127),
        Dim("total", 1, 16, 128, ("past", "seq")),
    )
    specs = [
        _stage("token_embedding", StageKind.EMBEDDING, [_t("ids", "batch", "seq", dtype="int64")],
               [_t("rows", "batch", "seq", 64)], llm_dims[:2]),
        _stage("llm", StageKind.LLM, [_t("inputs_embeds", "batch", "seq", 64)],
               [_t("logits", "batch", "seq", 100)], llm_dims, llm=GEOMETRY),
        _stage("image_encoder", StageKind.ENCODER, [_t("pixels", "batch", 3, 32, 32)], [_t("embeds", "batch", 32)], [BATCH]),
        _stage("audio_encoder", StageKind.ENCODER, [_t("mel", "batch", 1, 32, 32)], [_t("embeds", "batch", 32)], [BATCH]),
        _stage("input_projector", StageKind.INPUT_PROJECTOR, [_t("features", "batch", 32)], [_t("embeds", "batch", 64)], [BATCH]),
        _stage("image_output_projector", StageKind.OUTPUT_PROJECTOR, [_t("h", "batch", 4, 64)],
               [_t("cond", "batch", 77, 32)], [BATCH]),
        _stage("image_unet", StageKind.DECODER,
               [_t("sample", "batch", 4, 16, 16), _t("timestep", "batch"), _t("cond", "batch", 77, 32)],
               [_t("noise_pred", "batch", 4, 16, 16)], [Dim("batch", 1, 2, 8)]),
        _stage("image_vae_decoder", StageKind.VAE, [_t("latent", "batch", 4, 16, 16)],
               [_t("image", "batch", 3, 32, 32)], [BATCH]),
    ]  # fmt: skip
    pipeline = PipelineSpec("hand", tuple(specs), signal_tokens={"image": ["[IMG0]"]})
    stages, artifacts = {}, {}
    for s in specs:
        path = f"stages/{s.name}.onnx"
        if embedded or s.name == "token_embedding":
            stages[s.name] = StageBuild((Variant(Role.CANONICAL, path),))
            artifacts[path] = Artifact(path, "0" * 64, weights[s.name])
            continue
        data = f"{path}.data"
        stages[s.name] = StageBuild((Variant(Role.CANONICAL, path, "fp32", (data,)),))
        artifacts[path] = Artifact(path, "0" * 64, 64 * KiB)
        artifacts[data] = Artifact(data, "0" * 64, weights[s.name] - 64 * KiB)
    return Manifest(pipeline, stages, artifacts)


WEIGHTS = {
    "token_embedding": 1 * MiB,
    "llm": 40 * MiB,
    "image_encoder": 6 * MiB,
    "audio_encoder": 5 * MiB,
    "input_projector": 8 * MiB,  # the largest encoder-side stage, but needed by two request types
    "image_output_projector": 2 * MiB,
    "image_unet": 60 * MiB,
    "image_vae_decoder": 10 * MiB,
}
REQUESTS = ["text", "image-in-text-out", "audio-in-text-out", "text-to-image"]


@pytest.fixture
def manifest() -> Manifest:
    return hand_manifest(WEIGHTS)


def test_the_model_sums_its_parts(manifest):
    plan = plan_memory(manifest, None, REQUESTS)
    cost = {s: stage_memory(manifest, s).total for s in WEIGHTS}
    assert plan.kv_pool == kv_pool_bytes(manifest) == 2 * 4 * 1 * 2 * 128 * 16 * 4
    rise = max(stage_memory(manifest, s).opening for s in WEIGHTS)  # the embedding table's copy
    assert plan.fixed == plan.peaks["text"] - sum(cost[s] for s in plan.per_use + plan.resident[2:]) - rise
    # no budget: everything resident, so every request's peak is the whole pipeline's
    assert set(plan.resident) == set(WEIGHTS) and plan.per_use == ()
    assert len(set(plan.peaks.values())) == 1
    # a bigger graph costs more, and a session costs more than its bytes
    assert stage_memory(manifest, "image_unet").session > WEIGHTS["image_unet"]
    # more slots: a larger KV pool and a larger batched prefill
    llm_arena = stage_memory(manifest, "llm", 4).activation - stage_memory(manifest, "llm", 1).activation
    more = (
        plan_memory(manifest, None, ["text"], num_slots=4).fixed - plan_memory(manifest, None, ["text"]).fixed
    )
    assert llm_arena > 0 and more == 3 * plan.kv_pool + llm_arena


def test_opening_a_large_embedded_graph_raises_the_peak_for_a_moment(manifest):
    """A graph file read whole is held several times over while its session opens (read, parsed,
    loaded), before its arena exists: the peak is the settled sum plus the largest such rise."""
    embedded = hand_manifest(WEIGHTS, embedded=True)
    plan, before = (
        plan_memory(embedded, None, ["text-to-image"]),
        plan_memory(manifest, None, ["text-to-image"]),
    )
    unet = stage_memory(embedded, "image_unet")
    assert unet.session == stage_memory(manifest, "image_unet").session  # the same once settled
    assert unet.opening == unet.load - unet.total > 0
    rise, rise_before = (max(stage_memory(m, s).opening for s in WEIGHTS) for m in (embedded, manifest))
    assert rise == unet.opening > rise_before  # the largest graph rises the most
    assert plan.peak - rise == before.peak - rise_before  # the same settled sum


def test_a_tight_budget_keeps_the_llm_and_the_most_needed_stages(manifest):
    least = plan_memory(manifest, None, ["text-to-image"]).peaks["text-to-image"]  # its own stages only
    cost = {s: stage_memory(manifest, s).total for s in WEIGHTS}
    # room beside text-to-image for the shared input projector but not for it and an encoder too
    budget = least + cost["input_projector"] + min(cost["image_encoder"], cost["audio_encoder"]) - 1
    plan = plan_memory(manifest, budget, REQUESTS)
    assert plan.resident[:2] == ("token_embedding", "llm")
    assert "input_projector" in plan.resident  # needed by two request types: kept although larger
    assert {"image_encoder", "audio_encoder", "image_unet"} <= set(plan.per_use)
    assert all(p <= budget for p in plan.peaks.values())
    for s in plan.per_use:  # greedy to the end: no per-use stage could also have stayed resident
        kept = set(plan.resident) | {s}
        rise = stage_memory(manifest, "token_embedding").opening  # its table's copy; the graphs' is none
        worst = max(
            plan.fixed + sum(cost[x] for x in (kept - {"token_embedding", "llm"}) | set(plan.needs[r])) + rise
            for r in plan.requests
        )
        assert worst > budget
    # a budget for everything keeps everything
    everything = plan_memory(manifest, None, REQUESTS).peak
    assert plan_memory(manifest, everything, REQUESTS).per_use == ()
    assert plan_memory(manifest, everything - 1, REQUESTS).per_use != ()


def test_a_budget_nothing_fits_names_the_smallest_that_does(manifest):
    with pytest.raises(ConfigError) as exc:
        plan_memory(manifest, 20 * MiB, REQUESTS)
    message = str(exc.value)
    assert "fits no plan" in message and "text-to-image" in message and "\n" not in message
    smallest = parse_memory(
        re.search(r"smallest that does is ([\d.]+ [MG]iB)", message).group(1).replace(" ", "")
    )
    plan = plan_memory(manifest, smallest, REQUESTS)
    assert plan.peak <= smallest
    assert not {"image_encoder", "audio_encoder", "input_projector"} & set(plan.resident)
    with pytest.raises(ConfigError, match="fits no plan"):
        plan_memory(manifest, smallest - MiB // 10, REQUESTS)


def test_requests_the_build_cannot_serve(manifest):
    assert servable(manifest) == [
        *REQUESTS[:3],
        "video-in-text-out",
        REQUESTS[3],
    ]  # video frames go through the image encoder
    with pytest.raises(ConfigError, match="unknown request type 'text-to-smell'"):
        plan_memory(manifest, None, ["text-to-smell"])
    with pytest.raises(
        ConfigError, match="cannot serve 'text-to-video' requests: it has no 'video_output_projector'"
    ):
        request_stages(manifest, "text-to-video")
    assert plan_memory(manifest, None, ["any"]).requests == tuple(servable(manifest))


def test_native_decoding_follows_the_runtimes_backend_rule(monkeypatch):
    assert native_decoding("native") and not native_decoding("python")
    monkeypatch.setenv("OMNIFORGE_LLM_BACKEND", "python")
    assert not native_decoding("auto")
    monkeypatch.delenv("OMNIFORGE_LLM_BACKEND")
    assert native_decoding("auto") == (find_library() is not None)
    assert not native_decoding("auto", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(ConfigError):
        native_decoding("fast")


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 << 30), ("8G", 8 << 30), ("8GB", 8 * 10**9), ("512 MiB", 512 << 20), ("1.5gib", 3 << 29),
     ("2097152", 2 << 20)],
)  # fmt: skip
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "lots", "8 GiB RAM", "-1GiB", "1e3GB", "8XB", "0", "100KiB", "nan"])
def test_unreadable_memory_sizes(text):
    with pytest.raises(ConfigError):
        parse_memory(text)


# ---- the CLI on the default build -----------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omniforge", *args], capture_output=True, text=True, timeout=120
    )


def test_plan_prints_one_table_and_json(default_build):
    res = cli("plan", str(default_build), "--memory", "8GiB")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    lines = res.stdout.splitlines()
    manifest = load_manifest(default_build)
    assert lines[0].startswith(f"plan for {default_build}, budget 8.0 GiB")
    assert len(lines) == 3 + len(manifest.stages)  # header, table head, a row per stage, the peaks
    assert all("resident" in line for line in lines[2:-1])  # 8 GiB keeps everything
    data = json.loads(cli("plan", str(default_build), "--json", "--request", "text-to-image").stdout)
    assert data["requests"] == ["text-to-image"] and data["per_use"] == []
    assert data["peaks"]["text-to-image"] == plan_memory(manifest, None, ["text-to-image"]).peak


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--memory", "lots"], "cannot read memory size 'lots'"),
        (["--memory", "2MiB"], "fits no plan: the smallest that does is"),
        (["--request", "text-to-smell"], "invalid choice: 'text-to-smell'"),
        (["--slots", "0"], "--slots must lie in"),
    ],
)
def test_plan_refusals_are_one_sentence(default_build, args, needle):
    res = cli("plan", str(default_build), *args)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and needle in res.stderr and "Traceback" not in res.stderr


def test_run_refuses_a_budget_nothing_fits(default_build, tmp_path):
    res = cli("run", str(default_build), "--prompt", "hi", "--memory-budget", "3MiB", "--out", str(tmp_path))
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "fits no plan" in res.stderr


def test_run_with_a_budget_writes_the_image_and_reports_as_without(default_build, tmp_path):
    manifest = load_manifest(default_build)
    native = native_decoding()
    budget = max(plan_memory(manifest, None, [r], native=native).peak for r in servable(manifest)) + MiB
    args = ["--prompt", "a harbour", "--force", "image", "--steps", "2", "--max-new-tokens", "4"]
    res = cli("run", str(default_build), *args, "--memory-budget", f"{budget}", "--out", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    plain = cli("run", str(default_build), *args, "--out", str(tmp_path / "b"))
    assert res.stdout == plain.stdout  # the same text
    assert (tmp_path / "a" / "image_0.png").read_bytes() == (tmp_path / "b" / "image_0.png").read_bytes()


# ---- prediction against measured peak RSS ----------------------------------------------------


def measure(build: Path, request: str, budget: str = "", backend: str = "auto", **media: str) -> dict:
    return measure_requests(build, request, budget, backend, **media)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    from PIL import Image

    from omniforge.runtime.media import write_wav

    root = tmp_path_factory.mktemp("plan_media")
    x = np.linspace(0, 1, 64)  # a gradient: the tiny model answers it with text only
    rgb = np.stack([np.outer(x, x), np.outer(x, 1 - x), np.outer(1 - x, x)], -1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(root / "photo.png")
    write_wav(root / "clip.wav", (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000)
    return {
        "image-in-text-out": {"image": str(root / "photo.png")},
        "audio-in-text-out": {"audio": str(root / "clip.wav")},
    }


CASES = (
    [(r, "python") for r in ("text", "image-in-text-out", "audio-in-text-out")]
    + [(r, "python") for r in ("text-to-image", "text-to-video", "text-to-audio")]
    + [("text", "native"), ("image-in-text-out", "native"), ("text-to-image", "native")]
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
@pytest.mark.parametrize(("request_type", "backend"), CASES)
def test_prediction_within_15_percent_of_measured_peak(
    default_build, media, request_type, backend, request, monkeypatch
):
    """A fresh process opens the build and serves one request; its peak RSS above the interpreter's
    (runtime imported, build not yet opened) against the plan's peak for that request alone."""
    if backend == "native":  # the library tests/test_native.py builds
        lib = request.getfixturevalue("native_build") / "libomniforge.so"
        monkeypatch.setenv("OMNIFORGE_NATIVE_LIBRARY", str(lib))
    got = measure(default_build, request_type, backend=backend, **media.get(request_type, {}))
    assert got["backend"] == backend
    assert got["made"] == ([request_type.removeprefix("text-to-")] if "-to-" in request_type else [])
    manifest = load_manifest(default_build)
    predicted = plan_memory(manifest, None, [request_type], native=backend == "native").peaks[request_type]
    measured = got["peak"] - got["base"]
    assert abs(predicted - measured) <= 0.15 * measured, (request_type, predicted / MiB, measured / MiB)


def test_run_follows_the_plan_per_use_stages_close_after_each_request(default_build):
    """Under a budget that keeps no denoiser resident, requests one after another each open their
    decoder and close it after: the peak over all of them stays within 15% of the plan's peak (freed
    memory is handed back), and no decoder is left open."""
    manifest = load_manifest(default_build)
    smallest = plan_memory(manifest, None, ["text-to-video"]).peaks["text-to-video"]
    budget = smallest + 2 * MiB  # room for small stages beside the largest request, not for a second UNet
    plan = plan_memory(manifest, budget, ["any"])  # the python decode loop, as the child runs it
    assert {"image_unet", "video_unet"} <= set(plan.per_use)
    assert plan.resident[:2] == ("token_embedding", "llm")
    got = measure(default_build, "text-to-image,text-to-video,text-to-image", str(budget), backend="python")
    assert got["made"] == ["image", "video", "image"]
    assert set(got["loaded"]) <= set(plan.resident)  # per-use stages were closed
    measured = got["peak"] - got["base"]
    assert abs(plan.peak - measured) <= 0.15 * measured, (plan.peak / MiB, measured / MiB)
    # the denoisers' sessions (about 37 MiB together) left the process; heap fragments stay
    assert got["rss"] - got["base"] < plan.fixed + 12 * MiB
    # no budget: as before, every stage a request opened stays open
    image = set(request_stages(manifest, "text-to-image"))
    assert image <= set(measure(default_build, "text-to-image", backend="python")["loaded"])
