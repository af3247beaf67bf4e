"""TensorRT path without a GPU: profiles, flags, trtexec lines, metadata checks, the missing-TRT sentence."""

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from omniforge.engines.profiles import (
    fp32_layers,
    norm_groups,
    precision_flags,
    profile_for,
    strongly_typed,
    trt_version_tuple,
    trtexec_command,
)
from omniforge.engines.tensorrt import (
    EngineMetadata,
    check_compatible,
    engine_metadata,
    hardware_compatibility_name,
    require_tensorrt,
)
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
        trt_version="10.3",  # weakly typed: precision flags and pinned layers
    )
    assert cmd.startswith("trtexec --onnx=stages/video_unet.onnx --saveEngine=engines/video_unet.plan")
    assert "--minShapes=sample:1x4x1x8x8,timestep:1,encoder_hidden_states:1x77x32" in cmd
    assert "--optShapes=sample:2x4x4x8x8,timestep:2,encoder_hidden_states:2x77x32" in cmd
    assert "--maxShapes=sample:8x4x16x8x8" in cmd
    assert (
        "--fp16" in cmd
        and "--precisionConstraints=obey" in cmd
        and "--layerPrecisions=norm1:fp32,norm2:fp32" in cmd
        and "--layerOutputTypes=norm1:fp32,norm2:fp32" in cmd
    )
    assert "--timingCacheFile=timing.cache" in cmd


@pytest.mark.parametrize("version", ["10.12", "11", "11.1.0.12"])
def test_strongly_typed_trtexec_lines_carry_no_removed_option(pipeline, version):
    """From 10.12 the graph carries the precisions; TensorRT 11's trtexec rejects the weak-typing options."""
    cmd = trtexec_command(
        pipeline.stage("image_unet"),
        "stages/image_unet.fp16.onnx",
        "engines/image_unet.plan",
        "fp16",
        fp32_layers=["norm1"],
        trt_version=version,
    )
    assert "--stronglyTyped" in cmd and "--minShapes=" in cmd
    removed = (
        "--fp16",
        "--int8",
        "--int4",
        "--bf16",
        "--best",
        "--precisionConstraints",
        "--layerPrecisions",
        "--layerOutputTypes",
    )
    assert not [o for o in removed if o in cmd]


def test_typing_follows_the_tensorrt_version():
    assert not strongly_typed("10.3") and not strongly_typed("10.11.0") and strongly_typed("10.12")
    assert strongly_typed("11") and trt_version_tuple("10.12.0.36") == (10, 12)
    with pytest.raises(ConfigError, match="not a TensorRT version"):
        trt_version_tuple("eleven")


def test_precision_flags():
    assert precision_flags("fp32") == [] and precision_flags("bf16") == ["--bf16"]
    assert precision_flags("int8") == ["--fp16", "--int8"] and precision_flags("int4") == ["--fp16", "--int4"]
    with pytest.raises(ConfigError, match="precision 'fp64'"):
        precision_flags("fp64")


def test_engines_from_another_tensorrt_or_gpu_are_refused():
    meta = EngineMetadata("10.3.0", "NVIDIA H200", "9.0", "fp16", [])
    assert meta.hardware_compatibility == "none"
    check_compatible(meta, "10.3.0", ("NVIDIA H100", "9.0"))  # same architecture: fine
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0 but TensorRT 10.8.0"):
        check_compatible(meta, "10.8.0", ("NVIDIA H200", "9.0"))
    with pytest.raises(EngineError, match="compute capability 9.0 .* Orin \\(8.7\\)"):
        check_compatible(meta, "10.3.0", ("Orin", "8.7"))
    # Ampere-plus engines run on any GPU from compute capability 8.0 on, and on nothing older
    plus = replace(meta, hardware_compatibility="ampere_plus")
    for cc in ("8.0", "8.6", "9.0", "10.0", "12.0"):
        check_compatible(plus, "10.3.0", ("some GPU", cc))
    with pytest.raises(
        EngineError,
        match=r"^this engine was built for Ampere and later GPUs \(hardware compatibility ampere_plus, on "
        r"NVIDIA H200\) but this GPU is Tesla T4 \(compute capability 7.5\); rebuild it on this GPU$",
    ):
        check_compatible(plus, "10.3.0", ("Tesla T4", "7.5"))
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0"):  # the version binds every level
        check_compatible(plus, "10.12.0", ("NVIDIA H200", "9.0"))
    same = replace(meta, hardware_compatibility="same_compute_capability")
    check_compatible(same, "10.3.0", ("NVIDIA H100", "9.0"))
    with pytest.raises(EngineError, match="hardware compatibility same_compute_capability"):
        check_compatible(same, "10.3.0", ("NVIDIA A100", "8.0"))


def test_engine_metadata_records_version_capability_and_hardware_level(pipeline):
    """What ``build_engine`` writes into engines/engines.json, from the built engine's own level."""
    level = SimpleNamespace(name="AMPERE_PLUS")  # what trt.HardwareCompatibilityLevel.AMPERE_PLUS carries
    engine = SimpleNamespace(hardware_compatibility_level=level)
    meta = engine_metadata(engine, "10.12.0.36", ("NVIDIA H200", "9.0"), "int8", pipeline.stage("vocoder"))
    data = meta.to_dict()
    assert {k: data[k] for k in ("tensorrt", "gpu", "compute_capability", "hardware_compatibility")} == {
        "tensorrt": "10.12.0.36",
        "gpu": "NVIDIA H200",
        "compute_capability": "9.0",
        "hardware_compatibility": "ampere_plus",
    }
    assert data["precision"] == "int8" and data["strongly_typed"] is True
    assert data["profile"][0]["name"] == pipeline.stage("vocoder").inputs[0].name
    assert EngineMetadata.from_dict(json.loads(json.dumps(data))) == meta  # through engines.json
    # an engine that does not report its level: the level asked for
    assert (
        engine_metadata(object(), "10.3.0", ("Orin", "8.7"), "fp16", pipeline.stage("vocoder")).to_dict()[
            "hardware_compatibility"
        ]
        == "none"
    )
    # metadata written before the level was recorded still loads (as "none"); unknown keys are ignored
    old = {k: data[k] for k in ("tensorrt", "gpu", "compute_capability", "precision", "profile")}
    assert EngineMetadata.from_dict({**old, "later": 1}).hardware_compatibility == "none"
    with pytest.raises(EngineError, match="^the engine metadata of stage 'vocoder' lacks compute_capability"):
        EngineMetadata.from_dict({k: v for k, v in old.items() if k != "compute_capability"}, "vocoder")
    assert hardware_compatibility_name("HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY") == (
        "same_compute_capability"
    )
    with pytest.raises(ConfigError, match="hardware compatibility 'turing_plus' is not one of"):
        hardware_compatibility_name("turing_plus")


def test_compare_runs_the_llm_engine_against_the_graph_it_was_built_from():
    """With a TensorRT engine for the LLM, compare feeds the other build's graph of the engine's
    interface (explicit cache), not the in-place graph the runtime serves."""
    from omniforge.engines.compare import onnx_graph
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import Variant, canonical_stage

    sb = replace(
        canonical_stage("stages/llm.onnx")
        .with_variant(Variant(Role.ORT_INPLACE_LLM, "stages/llm.int4.ort.onnx", "int4"))
        .with_variant(Variant(Role.WEIGHT_ONLY_DQ, "stages/llm.int4.qdq.onnx", "int4")),
        precision="int4",
    )
    m = SimpleNamespace(stage_build=lambda _name: sb, stages={"llm": sb})
    assert onnx_graph(m, "llm", engine_interface=True) == "stages/llm.int4.qdq.onnx"
    fp32 = canonical_stage("stages/llm.onnx").with_variant(
        Variant(Role.ORT_INPLACE_LLM, "stages/llm.ort.onnx", "fp32")
    )
    m32 = SimpleNamespace(stage_build=lambda _name: fp32, stages={"llm": fp32})
    assert onnx_graph(m32, "llm", engine_interface=True) == "stages/llm.onnx"


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


def _rmsnorm_scopes(model) -> dict[str, set[str]]:
    """Each RMSNorm's arithmetic nodes, by the module scope torch gave them (``.../input_layernorm/Pow``)."""
    math = {"Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Reciprocal"}
    scopes: dict[str, set[str]] = {}
    for n in model.graph.node:
        scope, _, _ = n.name.rpartition("/")
        module = re.sub(r"_\d+$", "", scope.split("/")[-1])  # torch numbers repeated scopes: norm_1
        if n.op_type in math and module in {"input_layernorm", "post_attention_layernorm", "norm"}:
            scopes.setdefault(scope, set()).add(n.name)
    return scopes


def test_every_rmsnorm_of_the_canonical_llm_is_pinned_to_fp32_in_both_builders(default_build, pipeline):
    import onnx

    m = load_manifest(default_build)
    graph = m.stages["llm"].file
    model = onnx.load(str(default_build / graph), load_external_data=False)
    scopes = _rmsnorm_scopes(model)
    layers = pipeline.stage("llm").llm.num_layers
    assert len(scopes) == 2 * layers + 1  # two per decoder layer and the final norm
    pinned = fp32_layers(default_build / graph)
    for scope, nodes in scopes.items():
        assert {"Pow", "ReduceMean", "Sqrt"} <= {n.rsplit("/", 1)[1].split("_")[0] for n in nodes}, scope
        assert nodes <= set(pinned), scope
    cmd = trtexec_command(
        pipeline.stage("llm"), graph, "engines/llm.plan", "fp16", fp32_layers=pinned, trt_version="10.3"
    )
    for nodes in scopes.values():
        for n in nodes:
            assert f"{n}:fp32" in cmd
    assert not any(n.op_type == "MatMul" and n.name in pinned for n in model.graph.node)


def _graph(nodes, inits=(), opset=17, domains=()):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)), opset_imports=imports)


def _const(name, value):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def test_fused_norm_forms_are_pinned():
    from onnx import helper

    scale, bias = _const("scale", [1.0] * 8), _const("bias", [0.0] * 8)
    forms = {
        "LayerNormalization": (["x", "scale", "bias"], "", 17),
        "RMSNormalization": (["x", "scale"], "", 23),
        "SimplifiedLayerNormalization": (["x", "scale"], "com.microsoft", 17),
    }
    for op, (inputs, domain, opset) in forms.items():
        node = helper.make_node(op, inputs, ["y"], name=f"/norm/{op}", domain=domain)
        model = _graph([node], [scale, bias], opset, [domain] if domain else [])
        assert norm_groups(model) == [[f"/norm/{op}"]]


def test_decomposed_layernorm_is_pinned_and_other_squares_are_not():
    from onnx import helper

    two, eps = _const("two", 2.0), _const("eps", 1e-5)
    gamma, beta = _const("gamma", [1.0] * 8), _const("beta", [0.0] * 8)
    mk = helper.make_node
    layernorm = [
        mk("ReduceMean", ["x"], ["mean"], name="ln/mean", axes=[-1]),
        mk("Sub", ["x", "mean"], ["d"], name="ln/sub"),
        mk("Pow", ["d", "two"], ["d2"], name="ln/pow"),
        mk("ReduceMean", ["d2"], ["var"], name="ln/var", axes=[-1]),
        mk("Add", ["var", "eps"], ["ve"], name="ln/add"),
        mk("Sqrt", ["ve"], ["std"], name="ln/sqrt"),
        mk("Div", ["d", "std"], ["n"], name="ln/div"),
        mk("Mul", ["n", "gamma"], ["g"], name="ln/gamma"),
        mk("Add", ["g", "beta"], ["y"], name="ln/beta"),
    ]
    model = _graph(layernorm, [two, eps, gamma, beta])
    assert norm_groups(model) == [
        ["ln/pow", "ln/var", "ln/add", "ln/sqrt", "ln/div", "ln/gamma", "ln/beta", "ln/mean", "ln/sub"]
    ]
    squares = [  # x * x feeding a sum, not a norm
        mk("Mul", ["x", "x"], ["sq"], name="sq"),
        mk("ReduceSum", ["sq"], ["s"], name="sum", keepdims=1),
        mk("Add", ["x", "s"], ["y"], name="out"),
    ]
    assert norm_groups(_graph(squares)) == []


def test_strongly_typed_builds_take_the_graph_that_carries_the_precision():
    from omniforge.build import tensorrt_source
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import Variant, canonical_stage

    fp16 = canonical_stage("stages/unet.onnx").with_variant(
        Variant(Role.ORT, "stages/unet.fp16.onnx", "fp16")
    )
    fp16 = replace(fp16, precision="fp16")
    assert tensorrt_source(fp16, "11") == ("stages/unet.fp16.onnx", "fp16")  # FP16 weights, FP32 norms
    assert tensorrt_source(fp16, "10.3") == ("stages/unet.onnx", "fp16")  # the flag does it
    int4 = replace(
        canonical_stage("stages/llm.onnx").with_variant(
            Variant(Role.WEIGHT_ONLY_DQ, "stages/llm.int4.qdq.onnx", "int4")
        ),
        precision="int4",
    )
    assert (
        tensorrt_source(int4, "11") == tensorrt_source(int4, "10.3") == ("stages/llm.int4.qdq.onnx", "int4")
    )
