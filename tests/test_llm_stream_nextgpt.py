"""A NExT-GPT folder built with its LLM stages streamed from the shards (``llm_stream="always"``):
one build, every stage listed as a normal build lists it, running as the normal build runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omniforge.build import BuildOptions, build
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def builds(default_builds, tmp_path_factory, quick_quant):
    """The default model's normal fp32 build, and its builds with the LLM streamed at fp32 and int4
    (on the normal builds' cache), with their log lines."""
    normal, cache, _ = default_builds
    model = Path(load_manifest(normal["fp32"]).source["model"])
    root = tmp_path_factory.mktemp("nextgpt-stream")
    out = {"normal": normal["fp32"], "log": []}
    for precision in ("fp32", "int4"):
        opts = BuildOptions(precision=precision, llm_stream="always", cache=cache, quantize=quick_quant)
        build(model, root / precision, opts, log=out["log"].append)
        out[precision] = root / precision
    return out


def _run(path):
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    image = (np.stack([xx, yy, (xx + yy) / 2], -1) * 255).astype(np.uint8)
    return Pipeline(path).run(
        "Describe the picture",
        image=image,
        generation=GenerationConfig(max_new_tokens=16),
        diffusion=DiffusionConfig(steps=2, seed=0),
        force=["image"],
    )


def test_streamed_fp32_build_runs_as_the_normal_build(builds):
    normal, streamed = load_manifest(builds["normal"]), load_manifest(builds["fp32"])
    assert list(streamed.stages) == list(normal.stages)
    assert streamed.pipeline.to_dict() == normal.pipeline.to_dict()  # edges and signal tokens included
    assert streamed.source["kind"] == "nextgpt" and "llm_stream" in streamed.source
    for name, sb in normal.stages.items():  # the other stages are the normal build's, byte for byte
        if name not in ("token_embedding", "llm"):
            assert streamed.stages[name] == sb
            assert all(streamed.artifacts[f].sha256 == normal.artifacts[f].sha256 for f in sb.files())
    # the other stages' graphs equal the normal build's, so each one's optimization was reused
    reused = [line for line in builds["log"] if line.endswith("nodes (cached)")]
    assert len(reused) == len(normal.stages) - 2
    inplace = streamed.variant("llm", Role.ORT_INPLACE_LLM)
    canonical = streamed.variant("llm", Role.CANONICAL)
    assert canonical.file == inplace.file  # no traced FP32 graph, as the manifest says
    assert "was not written" in streamed.source["llm_stream"]["canonical"]
    parity = [r["stage"] for r in json.loads((builds["fp32"] / "parity.json").read_text())]
    assert parity == list(normal.stages)
    assert set(normal.files) <= set(streamed.files)
    a, b = _run(builds["normal"]), _run(builds["fp32"])
    assert b.generation.token_ids == a.generation.token_ids
    assert len(a.images) == len(b.images) == 1
    np.testing.assert_allclose(b.images[0], a.images[0], atol=2e-3)


def test_streamed_int4_nextgpt_build_runs(builds):
    m = load_manifest(builds["int4"])
    assert list(m.stages) == list(load_manifest(builds["normal"]).stages)
    assert m.stages["llm"].precision == "int4" and m.stages["token_embedding"].precision == "int8"
    assert m.stages["image_unet"].precision == "int8"  # quantized as a normal int4 build quantizes it
    plan = m.source["precision_plan"]
    assert plan == {name: sb.precision for name, sb in m.stages.items()}
    report = [r["stage"] for r in json.loads((builds["int4"] / "quantize.json").read_text())]
    assert report == list(m.stages)
    r = _run(builds["int4"])
    assert len(r.generation.token_ids) > 0 and r.images[0].shape == (32, 32, 3)
