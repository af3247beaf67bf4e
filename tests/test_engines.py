"""TensorRT path without a GPU: profiles, flags, trtexec lines, metadata checks, the missing-TRT sentence."""

import pytest

from omniforge.engines.profiles import precision_flags, profile_for, trtexec_command
from omniforge.engines.tensorrt import EngineMetadata, check_compatible, require_tensorrt
from omniforge.errors import ConfigError, EngineError, MissingDependencyError
from omniforge.pipeline.manifest import load_manifest


@pytest.fixture(scope="module")
def pipeline(default_build):
    return load_manifest(default_build).pipeline


def test_llm_profile_follows_the_dims_including_derived_total(pipeline):
    prof = {p.name: p for p in profile_for(pipeline.stage("llm"))}
    mask = prof["attention_mask"]
    assert mask.min == (1, 1) and mask.opt == (1, 32) and mask.max == (8, 256)
    past = prof["past_key_values.0.key"]
    assert past.min == (1, 2, 0, 16) and past.opt == (1, 2, 16, 16) and past.max == (8, 2, 255, 16)


def test_unet_profile_varies_only_the_batch(pipeline):
    prof = profile_for(pipeline.stage("image_unet"))
    sample = prof[0]
    assert sample.min == (1, 4, 16, 16) and sample.opt == (2, 4, 16, 16) and sample.max == (8, 4, 16, 16)


def test_trtexec_line_has_shapes_precision_and_fp32_norms(pipeline):
    cmd = trtexec_command(
        pipeline.stage("video_unet"),
        "stages/video_unet.onnx",
        "engines/video_unet.plan",
        precision="fp16",
        fp32_layers=["norm1", "norm2"],
    )
    assert cmd.startswith("trtexec --onnx=stages/video_unet.onnx --saveEngine=engines/video_unet.plan")
    assert "--minShapes=sample:1x4x1x8x8,timestep:1,encoder_hidden_states:1x77x32" in cmd
    assert "--optShapes=sample:2x4x4x8x8,timestep:2,encoder_hidden_states:2x77x32" in cmd
    assert "--maxShapes=sample:8x4x16x8x8" in cmd
    assert (
        "--fp16" in cmd
        and "--precisionConstraints=obey" in cmd
        and "--layerPrecisions=norm1:fp32,norm2:fp32" in cmd
    )
    assert "--timingCacheFile=timing.cache" in cmd


def test_precision_flags():
    assert precision_flags("fp32") == [] and precision_flags("bf16") == ["--bf16"]
    assert precision_flags("int8") == ["--fp16", "--int8"] and precision_flags("int4") == ["--fp16", "--int4"]
    with pytest.raises(ConfigError, match="precision 'fp64'"):
        precision_flags("fp64")


def test_engines_from_another_tensorrt_or_gpu_are_refused():
    meta = EngineMetadata("10.3.0", "NVIDIA H200", "9.0", "fp16", [])
    check_compatible(meta, "10.3.0", ("NVIDIA H100", "9.0"))  # same architecture: fine
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0 but TensorRT 10.8.0"):
        check_compatible(meta, "10.8.0", ("NVIDIA H200", "9.0"))
    with pytest.raises(EngineError, match="compute capability 9.0 .* Orin \\(8.7\\)"):
        check_compatible(meta, "10.3.0", ("Orin", "8.7"))


def test_without_tensorrt_one_sentence_points_at_onnxruntime():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="use --backend onnxruntime"):
            require_tensorrt()
    else:
        pytest.skip("TensorRT is installed here")


@pytest.mark.gpu
def test_tensorrt_engine_builds_where_available(default_build, tmp_path):
    pytest.importorskip("tensorrt")
    from omniforge.engines.tensorrt import build_engine, gpu_info

    if gpu_info() is None:
        pytest.skip("no GPU")
    m = load_manifest(default_build)
    meta = build_engine(
        m.pipeline.stage("input_projector"),
        default_build / m.stages["input_projector"].file,
        tmp_path / "p.plan",
        "fp16",
        tmp_path / "timing.cache",
    )
    assert (tmp_path / "p.plan").stat().st_size > 0 and meta.precision == "fp16"
