"""The bad-input catalogue: each bad input gets its typed error and one clear message, and nothing
is written or corrupted (the build folder is hashed before and after the whole catalogue)."""

import hashlib
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from omniforge.cli import main
from omniforge.errors import (
    CachePoolExhaustedError,
    ConfigError,
    ContextLengthError,
    InputError,
    ManifestError,
    ModelNotFoundError,
    OmniforgeError,
    StageError,
)
from omniforge.pipeline.model_config import load_model_config
from omniforge.runtime import media as M
from omniforge.runtime.build import Build
from omniforge.runtime.engine import SessionConfig, validate_feeds
from omniforge.runtime.kv_cache import KVCachePool
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ctx(default_build, default_model, tmp_path_factory):
    """Runtimes over the real default build, plus a scratch folder of broken files."""
    before = tree_digest(default_build)
    d = tmp_path_factory.mktemp("bad")
    (d / "text.png").write_text("not an image")
    (d / "folder.png").mkdir()
    (d / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt junk")
    with wave.open(str(d / "empty.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    (d / "noframes").mkdir()
    (d / "broken.gif").write_bytes(b"GIF89a\x00")

    # build copies to break in different ways
    def broken(name, edit):
        b = d / name
        shutil.copytree(default_build, b)
        edit(b)
        return b

    def set_manifest(key, value):
        def edit(b):
            m = json.loads((b / "manifest.json").read_text())
            m[key] = value
            (b / "manifest.json").write_text(json.dumps(m))

        return edit

    def truncate(b):
        f = b / "stages" / "vocoder.onnx"
        f.write_bytes(f.read_bytes()[:100])

    def extra_stage(b):
        m = json.loads((b / "manifest.json").read_text())
        m["stages"]["ghost"] = m["stages"]["vocoder"]
        (b / "manifest.json").write_text(json.dumps(m))

    def escape(b):
        m = json.loads((b / "manifest.json").read_text())
        m["artifacts"][0]["path"] = "/etc/passwd"
        (b / "manifest.json").write_text(json.dumps(m))

    builds = {
        "truncated": broken("truncated", truncate),
        "schema": broken("schema", set_manifest("schema_version", 3)),
        "ghost": broken("ghost", extra_stage),
        "escape": broken("escape", escape),
        "notjson": broken("notjson", lambda b: (b / "manifest.json").write_text("{")),
    }
    bad_models = {}
    for name, desc in {
        "version": {"format": "omniforge-nextgpt", "format_version": 7},
        "missing_part": {"format": "omniforge-nextgpt", "format_version": 1, "llm": "nowhere"},
        "bad_adapter": {
            "format": "omniforge-nextgpt",
            "format_version": 1,
            "llm": str(default_model / "llm"),
            "merge_adapter": "smell",
        },
        "video_encoder": {
            "format": "omniforge-nextgpt",
            "format_version": 1,
            "llm": str(default_model / "llm"),
            "encoders": {"video": str(default_model / "image_encoder")},
        },
    }.items():
        (d / name).mkdir()
        (d / name / "nextgpt.json").write_text(json.dumps(desc))
        bad_models[name] = d / name
    c = {
        "build": default_build,
        "b": Build(default_build),
        "rt": LlmRuntime(default_build, num_slots=2),
        "pipe": Pipeline(default_build),
        "d": d,
        "builds": builds,
        "models": bad_models,
        "model": default_model,
    }
    yield c
    assert tree_digest(default_build) == before, "the catalogue modified the build folder"


def llm_feeds(b, **over):
    feeds = b.pipeline.stage("llm").sample_inputs({"batch": 1, "seq": 2, "past": 3})
    feeds.update(over)
    return {k: v for k, v in feeds.items() if v is not None}


H = 64
CASES = {
    # build folders and manifests
    "build folder missing": (lambda c: Build(c["d"] / "nope"), ManifestError, "not a build folder"),
    "manifest not JSON": (lambda c: Build(c["builds"]["notjson"]), ManifestError, "not valid JSON"),
    "schema version from the future": (
        lambda c: Build(c["builds"]["schema"]),
        ManifestError,
        "schema version 3 is not supported",
    ),
    "stage the pipeline does not describe": (lambda c: Build(c["builds"]["ghost"]), ManifestError, "'ghost'"),
    "absolute artifact path": (
        lambda c: Build(c["builds"]["escape"]),
        ManifestError,
        "leaves the build folder",
    ),
    "truncated ONNX detected by hash": (lambda c: Build(c["builds"]["truncated"]), ManifestError, "SHA-256"),
    "truncated ONNX loaded unverified": (
        lambda c: Build(c["builds"]["truncated"], verify=False).engine("vocoder"),
        ManifestError,  # graphs are verified when opened, even when the upfront check is skipped
        "'stages/vocoder.onnx' does not match its SHA-256",
    ),
    "unknown stage": (lambda c: c["b"].engine("warp_drive"), StageError, "unknown stage 'warp_drive'"),
    "unknown variant": (
        lambda c: c["b"].stage_file("vocoder", "tensorrt_engine"),
        StageError,
        "no 'tensorrt_engine' variant",
    ),
    "unknown variant role": (
        lambda c: c["b"].stage_file("vocoder", "fastest"),
        StageError,
        "'fastest' is not a variant role",
    ),
    "missing config role": (lambda c: c["b"].file("nonsense"), ManifestError, "no 'nonsense' file"),
    # stage inputs
    "missing input": (
        lambda c: c["b"].engine("llm").run(llm_feeds(c["b"], position_ids=None)),
        InputError,
        "missing \\['position_ids'\\]",
    ),
    "unexpected input": (
        lambda c: c["b"].engine("vocoder").run({"mel": np.zeros((1, 4, 16), np.float32), "x": np.zeros(1)}),
        InputError,
        "unexpected \\['x'\\]",
    ),
    "wrong dtype": (
        lambda c: c["b"].engine("vocoder").run({"mel": np.zeros((1, 4, 16), np.float64)}),
        InputError,
        "must be float32, got float64",
    ),
    "wrong rank": (
        lambda c: c["b"].engine("vocoder").run({"mel": np.zeros((4, 16), np.float32)}),
        InputError,
        "must have rank 3",
    ),
    "wrong static size": (
        lambda c: c["b"].engine("vocoder").run({"mel": np.zeros((1, 4, 15), np.float32)}),
        InputError,
        "axis 2 must be 16",
    ),
    "dynamic size out of range": (
        lambda c: c["b"].engine("image_encoder").run({"pixel_values": np.zeros((33, 3, 32, 32), np.float32)}),
        InputError,
        "'batch'=33 is outside",
    ),
    "inconsistent dynamic sizes": (
        lambda c: c["b"].engine("llm").run(llm_feeds(c["b"], position_ids=np.zeros((1, 3), np.int64))),
        InputError,
        "dim 'seq' is 2 in one input and 3",
    ),
    "derived dim mismatch": (
        lambda c: c["b"].engine("llm").run(llm_feeds(c["b"], attention_mask=np.ones((1, 9), np.int64))),
        InputError,
        "'total' must equal past \\+ seq",
    ),
    "NaN input": (
        lambda c: c["b"].engine("vocoder").run({"mel": np.full((1, 4, 16), np.nan, np.float32)}),
        InputError,
        "NaN or Inf",
    ),
    "not an array": (
        lambda c: c["b"].engine("vocoder").run({"mel": [[0.0]]}),
        InputError,
        "must be a numpy array",
    ),
    "token id out of vocabulary (engine)": (
        lambda c: c["b"].engine("token_embedding").run({"input_ids": np.array([[1, 10**6]])}),
        InputError,
        "values must lie in \\[0, ",
    ),
    # LLM requests
    "prompt longer than the context": (
        lambda c: c["rt"].generate(list(range(4, 300))),
        ContextLengthError,
        "the context holds 256",
    ),
    "empty prompt": (lambda c: c["rt"].generate([]), InputError, "the prompt is empty"),
    "token ids out of vocabulary": (lambda c: c["rt"].generate([1, -3]), InputError, "token ids must lie in"),
    "token ids of rank 2": (lambda c: c["rt"].embed_ids([[1, 2]]), InputError, "one-dimensional"),
    "embeddings of the wrong width": (
        lambda c: c["rt"].generate(np.zeros((3, 7), np.float32)),
        InputError,
        "shape \\(T, 64\\)",
    ),
    "embeddings with Inf": (
        lambda c: c["rt"].generate(np.full((3, H), np.inf, np.float32)),
        InputError,
        "NaN or Inf",
    ),
    "media without a placeholder": (
        lambda c: c["rt"].generate("hi", media={"image": [np.zeros((1, H), np.float32)]}),
        InputError,
        "fewer placeholders than media",
    ),
    "unknown media modality": (
        lambda c: c["rt"].prepare("<image>", media={"smell": [np.zeros((1, H), np.float32)]}),
        InputError,
        "unknown modality 'smell'",
    ),
    "media embeddings of the wrong shape": (
        lambda c: c["rt"].prepare("<image>", media={"image": [np.zeros(H, np.float32)]}),
        InputError,
        "image embeddings must have shape",
    ),
    "KV pool exhausted": (lambda c: _exhaust(c["rt"]), CachePoolExhaustedError, "no 1 free adjacent slot"),
    "negative temperature": (
        lambda c: GenerationConfig(temperature=-1),
        ConfigError,
        "temperature must be >= 0",
    ),
    "top_p above one": (lambda c: GenerationConfig(top_p=1.5), ConfigError, "top_p must lie in"),
    "negative top_k": (lambda c: GenerationConfig(top_k=-2), ConfigError, "top_k must be >= 0"),
    "zero repetition penalty": (
        lambda c: GenerationConfig(repetition_penalty=0),
        ConfigError,
        "repetition_penalty must be > 0",
    ),
    "zero new tokens": (
        lambda c: GenerationConfig(max_new_tokens=0),
        ConfigError,
        "max_new_tokens must be >= 1",
    ),
    "pool context beyond the model": (
        lambda c: KVCachePool(c["rt"].geometry, 1, 10_000),
        ConfigError,
        "max context 10000",
    ),
    "pool without slots": (lambda c: KVCachePool(c["rt"].geometry, 0), ConfigError, "at least one slot"),
    # media
    "missing image": (lambda c: M.load_image(c["d"] / "none.png"), InputError, "does not exist"),
    "corrupt image": (lambda c: M.load_image(c["d"] / "text.png"), InputError, "not a readable image"),
    "image path is a folder": (lambda c: M.load_image(c["d"] / "folder.png"), InputError, "is a folder"),
    "image array of the wrong dtype": (
        lambda c: M.preprocess_image(np.zeros((4, 4, 3), np.float32), {}),
        InputError,
        "uint8",
    ),
    "corrupt WAV": (lambda c: M.load_wav(c["d"] / "junk.wav"), InputError, "not a readable PCM WAV"),
    "WAV without samples": (lambda c: M.load_wav(c["d"] / "empty.wav"), InputError, "holds no audio samples"),
    "video folder without frames": (
        lambda c: M.load_video_frames(c["d"] / "noframes", 4),
        InputError,
        "holds no image frames",
    ),
    "corrupt GIF": (
        lambda c: M.load_video_frames(c["d"] / "broken.gif", 4),
        InputError,
        "not a readable video",
    ),
    # pipeline options
    "forced unknown modality": (
        lambda c: c["pipe"].run("x", force=["smell"]),
        InputError,
        "unknown modality",
    ),
    "zero diffusion steps": (lambda c: DiffusionConfig(steps=0), ConfigError, "steps must be >= 1"),
    "negative guidance": (
        lambda c: DiffusionConfig(guidance_scale=-1),
        ConfigError,
        "guidance scale must be >= 0",
    ),
    "unknown scheduler": (
        lambda c: DiffusionConfig(scheduler="pndm"),
        ConfigError,
        "unknown scheduler 'pndm'",
    ),
    "unknown graph optimization level": (
        lambda c: SessionConfig(graph_optimization="max"),
        ConfigError,
        "graph optimization 'max'",
    ),
    "unavailable execution provider": (
        lambda c: SessionConfig(providers=("TensorrtExecutionProvider",)),
        ConfigError,
        "not available",
    ),
    # model folders
    "model folder missing": (
        lambda c: load_model_config(c["d"] / "nothing"),
        ModelNotFoundError,
        "does not exist",
    ),
    "not a model folder": (
        lambda c: load_model_config(c["d"] / "noframes"),
        ModelNotFoundError,
        "neither nextgpt.json",
    ),
    "description of another version": (
        lambda c: load_model_config(c["models"]["version"]),
        ConfigError,
        "not a version 1",
    ),
    "description names a missing part": (
        lambda c: load_model_config(c["models"]["missing_part"]),
        ModelNotFoundError,
        "'nowhere'",
    ),
    "unknown adapter to merge": (
        lambda c: load_model_config(c["models"]["bad_adapter"]),
        ConfigError,
        "merge_adapter 'smell'",
    ),
    "video encoder named": (
        lambda c: load_model_config(c["models"]["video_encoder"]),
        ConfigError,
        "video goes through the image encoder",
    ),
}


def _exhaust(rt):
    rt.prefix_cache.clear()
    taken = rt.pool.allocate(rt.pool.num_slots)
    try:
        rt.generate("hello", GenerationConfig(max_new_tokens=2))
    finally:
        rt.pool.release(taken)


def test_the_catalogue_has_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(ctx, name):
    fn, exc, message = CASES[name]
    with pytest.raises(exc, match=message) as info:
        fn(ctx)
    assert isinstance(info.value, OmniforgeError)
    assert "\n" not in str(info.value)


CLI_CASES = {
    "run on a missing build": (["run", "{d}/nope", "--prompt", "x"], "not a build folder"),
    "run with an overlong prompt": (
        ["run", "{build}", "--prompt", "one two " * 300],
        "the context holds 256",
    ),
    "run with a bad top-p": (["run", "{build}", "--prompt", "x", "--top-p", "0"], "top_p must lie in"),
    "run with a corrupt image": (
        ["run", "{build}", "--prompt", "x", "--image", "{d}/text.png"],
        "not a readable image",
    ),
    "run with a corrupt WAV": (
        ["run", "{build}", "--prompt", "x", "--audio", "{d}/junk.wav"],
        "not a readable PCM WAV",
    ),
    "run on a tampered build": (["run", "{d}/truncated", "--prompt", "x"], "SHA-256"),
    "inspect a build of another schema": (["inspect", "{d}/schema"], "schema version 3"),
    "export a missing model": (["export", "{d}/nothing", "--out", "{d}/never"], "does not exist"),
    "export an unsupported opset": (
        ["export", "{model}", "--out", "{d}/never", "--opset", "9"],
        "opset 9 is not supported",
    ),
    "export an unknown stage": (
        ["export", "{model}", "--out", "{d}/never", "--stages", "nope"],
        "unknown stage 'nope'",
    ),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_cli_input(ctx, name, capsys):
    args, message = CLI_CASES[name]
    args = [a.format(d=ctx["d"], build=ctx["build"], model=ctx["model"]) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("omniforge: error:") and message in err[0], err
    assert not (ctx["d"] / "never").exists()
    assert not list(ctx["d"].glob(".never*"))


# ---- property-based checks of the validators ----------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=40),
    )
)
def test_validator_accepts_exactly_well_formed_inputs(default_build, arr):
    spec = Build(default_build, verify=False).pipeline.stage("vocoder")
    ok = (
        arr.dtype == np.float32
        and arr.ndim == 3
        and arr.shape[2] == 16
        and 1 <= arr.shape[0] <= 8
        and 1 <= arr.shape[1] <= 512
        and (arr.size == 0 or np.isfinite(arr).all())
    )
    try:
        validate_feeds(spec, {"mel": arr})
    except InputError:
        assert not ok
    else:
        assert ok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(-5, 600), min_size=1, max_size=20))
def test_token_validation_matches_the_vocabulary(default_build, ids):
    spec = Build(default_build, verify=False).pipeline.stage("token_embedding")
    vocab = spec.inputs[0].high
    try:
        validate_feeds(spec, {"input_ids": np.asarray([ids], np.int64)})
    except InputError:
        assert min(ids) < 0 or max(ids) >= vocab
    else:
        assert 0 <= min(ids) and max(ids) < vocab
