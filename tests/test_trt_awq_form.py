"""AWQ reaches TensorRT's weight-only form: the DequantizeLinear graph quantizes the same scaled
weights as ONNX Runtime's ``MatMulNBits`` graph, with the same scaled gammas and up_proj columns
(``awq.fold_into_canonical``), so the two INT4 forms compute one function within INT4 rounding."""

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from omniforge.calibration.awq import GROUPS, fold_into_canonical, fold_scales, search_scales
from omniforge.calibration.codes import dequantize, rtn_codes
from omniforge.calibration.metrics import cosine
from omniforge.calibration.quantize import calibration_rows, quantize_build
from omniforge.calibration.tensors import canonical_prefill, inplace_prefill, num_layers
from omniforge.calibration.weight_only import WeightOnlyConfig
from omniforge.engines.trt_check import check_build
from omniforge.errors import ExportError
from omniforge.pipeline.contracts import Role, layer_tap
from omniforge.pipeline.manifest import load_manifest


def arrays(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in m.graph.initializer}


def linears(m: onnx.ModelProto) -> dict[str, str]:
    """MatMul node name -> its constant 2-D weight."""
    inits = {t.name: t for t in m.graph.initializer}
    return {
        n.name: n.input[1]
        for n in m.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    }


def columns_of(m: onnx.ModelProto, inplace: dict[str, np.ndarray], taps: list[str]) -> dict[str, tuple]:
    """MatMul node name -> (in-place weight, its columns) that its weight equals, by brute force."""
    weights, where = arrays(m), {}
    for node, name in linears(m).items():
        w = weights[name]
        for tap in taps:
            o = inplace[tap]
            if o.shape[0] != w.shape[0]:
                continue
            n = w.shape[1]
            j = next((j for j in range(o.shape[1] - n + 1) if np.array_equal(o[:, j : j + n], w)), None)
            if j is not None:
                where[node] = (tap, slice(j, j + n))
    return where


@pytest.fixture(scope="module")
def llm(default_build):
    m = load_manifest(default_build)
    inplace = m.stages["llm"].variant(Role.ORT_INPLACE_LLM)
    return (
        m.pipeline.stage("llm"),
        inplace.contract,
        onnx.load(str(default_build / inplace.file)),
        onnx.load(str(default_build / m.stages["llm"].file)),
        calibration_rows(default_build, count=2, length=16),
    )


def test_the_canonical_graph_carries_the_inplace_scales_with_its_function_unchanged(llm):
    """On the exported canonical graph (gammas as Muls) and the optimized one (gammas folded into the
    q/k/v and gate/up weights by fold_norm_linear): the scaled canonical weights are the in-place
    graph's scaled columns, and the FP32 logits do not move."""
    from omniforge.passes.manager import optimize_stage

    spec, contract, inplace, exported, rows = llm
    scales = search_scales(inplace, contract, rows, 4, 32)
    assert any(np.abs(ls.scale - 1).max() > 0.1 for ls in scales)  # AWQ moved something
    scaled_inplace = arrays(fold_scales(inplace, contract, scales))
    taps = [layer_tap(contract, i, t) for i in range(num_layers(contract)) for g in GROUPS for t in g[1]]
    where = columns_of(exported, arrays(inplace), taps)
    assert len(where) == 3 * 2 + 3 * 2  # q, k, v, gate, up, down per layer
    optimized, report = optimize_stage(exported, spec)
    assert report.passed and any(w.endswith("folded_weight") for w in linears(optimized).values())
    feeds = canonical_prefill(spec, rows[0])
    for canonical in (exported, optimized):
        carried = fold_into_canonical(canonical, inplace, contract, scales)
        onnx.checker.check_model(carried)
        a, b = (
            ort.InferenceSession(m.SerializeToString()).run(["logits"], feeds)[0]
            for m in (canonical, carried)
        )
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
        got, weight_of = arrays(carried), linears(carried)
        for node, (tap, cols) in where.items():
            np.testing.assert_allclose(
                got[weight_of[node]], scaled_inplace[tap][:, cols], rtol=1e-6, atol=1e-7
            )


def test_a_canonical_graph_without_the_scaled_weights_is_refused(llm):
    spec, contract, inplace, exported, rows = llm
    scales = search_scales(inplace, contract, rows, 4, 32)
    other = onnx.ModelProto()
    other.CopyFrom(exported)
    w = next(t for t in other.graph.initializer if t.name == linears(exported)["/mlp/up_proj/MatMul"])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    with pytest.raises(ExportError, match="layer 0's gate_weight, up_weight weights"):
        fold_into_canonical(other, inplace, contract, scales)


def nbits_weights(m: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """In-place weight -> (its dequantized ``MatMulNBits`` weight (K, N), its step per element):
    4-bit symmetric codes, the low nibble first, zero point 8."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in n.attribute}
        k, block = attrs["K"], attrs["block_size"]
        packed = inits[n.input[1]]  # (N, blocks, block / 2)
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)[:, :k]
        scale = np.repeat(inits[n.input[2]].reshape(packed.shape[0], -1), block, axis=1)[:, :k]
        w = (codes.astype(np.float32) - 8) * scale
        out[n.input[1].rsplit("_Q", 1)[0]] = (w.T, np.abs(scale.T))
    return out


def tensorrt_weights(m: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MatMul node name -> (its dequantized weight (K, N), its step per element; a weight left FP16:
    its own rounding)."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type != "MatMul":
            continue
        w, dq = n.input[1], producer.get(n.input[1])
        while dq is not None and dq.op_type == "Cast":
            w, dq = dq.input[0], producer.get(dq.input[0])
        if w in inits and inits[w].ndim == 2:  # left FP16
            out[n.name] = (inits[w].astype(np.float32), np.abs(inits[w].astype(np.float32)) * 2.0**-11)
        elif dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            block = next(a.i for a in dq.attribute if a.name == "block_size")
            scale = np.repeat(inits[dq.input[1]].astype(np.float32), block, axis=0)
            out[n.name] = (inits[dq.input[0]].astype(np.float32) * scale, np.abs(scale))
    return out


def test_both_int4_forms_quantize_the_same_awq_scaled_weights(
    default_build, quick_quant, tmp_path, llm, monkeypatch
):
    """An ``--method awq`` INT4 build: TensorRT's form holds the RTN codes (blocks of 64, positive
    scales) of the AWQ-scaled weights (the scales the build searched, folded into the in-place
    graph), not those of the unscaled weights (the form before), and the ``MatMulNBits`` weights
    are within a step of the same scaled weights; the form's gammas are the ``MatMulNBits`` graph's
    scaled ones, and the two forms' logits agree as far as INT4 in blocks of 32 and 64 can."""
    import omniforge.calibration.awq as awq

    spec, contract, inplace, exported, rows = llm
    searched, search = [], awq.search_scales

    def recording(*args, **kwargs):
        searched.append(search(*args, **kwargs))
        return searched[-1]

    monkeypatch.setattr(awq, "search_scales", recording)
    keep = {name: "fp32" for name in load_manifest(default_build).stages if name != "llm"}  # the LLM alone
    out = tmp_path / "awq"
    q, results = quantize_build(
        default_build,
        out,
        "int4",
        WeightOnlyConfig(method="awq"),
        log=lambda _m: None,
        options=replace(quick_quant, end_to_end=False),
        overrides=keep,
    )
    assert len(searched) == 1  # one search serves both forms
    assert "AWQ-scaled weights, RTN symmetric codes" in next(r for r in results if r.stage == "llm").note
    assert not [f.violations for f in check_build(out, ["10.12", "11"], ["llm"]) if f.violations]
    scaled = arrays(fold_scales(inplace, contract, searched[0]))
    nbits_graph = onnx.load(str(out / q.stages["llm"].variant(Role.ORT_INPLACE_LLM).file))
    std_graph = onnx.load(str(out / q.stages["llm"].variant(Role.WEIGHT_ONLY_DQ).file))
    nbits, std = nbits_weights(nbits_graph), tensorrt_weights(std_graph)
    originals = arrays(exported)
    taps = [layer_tap(contract, i, t) for i in range(num_layers(contract)) for g in GROUPS for t in g[1]]
    where = columns_of(exported, arrays(inplace), taps)
    assert len(where) == 12
    unscaled_off = 0
    for node, (tap, cols) in where.items():
        want = scaled[tap][:, cols]
        w_nbits, step_nbits = (a[:, cols] for a in nbits[tap])
        assert (np.abs(w_nbits - want) <= step_nbits * (1 + 1e-5) + 1e-7).all(), node
        w_std, step_std = std[node]
        if node in linears(std_graph):  # K is no multiple of 64: left FP16
            np.testing.assert_allclose(w_std, want, rtol=2**-10, atol=1e-7)
            continue
        rtn, unscaled = (
            dequantize(rtn_codes(w, 4, 64, positive=True), 64)
            for w in (want, originals[linears(exported)[node]])
        )
        assert (np.abs(w_std - rtn) <= step_std / 100).all(), node  # up to the FP16 scales' rounding
        unscaled_off += int((np.abs(w_std - unscaled) > step_std / 100).sum())
    assert unscaled_off > 1000, unscaled_off  # of 2 * 14336 codes
    nbits_inits, std_inits = arrays(nbits_graph), arrays(std_graph)
    moved = 0
    for i in range(num_layers(contract)):
        for tap in (layer_tap(contract, i, g[2]) for g in GROUPS if g[2]):
            gamma = next(n for n, a in originals.items() if np.array_equal(a, arrays(inplace)[tap]))
            np.testing.assert_allclose(std_inits[gamma], nbits_inits[tap], rtol=1e-3)  # the form's FP16 gamma
            moved += not np.allclose(nbits_inits[tap], originals[gamma], rtol=1e-2)
    assert moved >= 2
    sess = lambda m: ort.InferenceSession(m.SerializeToString())  # noqa: E731
    a = sess(nbits_graph).run([contract.slot("logits")], inplace_prefill(contract, rows[0]))[0][0, -1]
    b = sess(std_graph).run(["logits"], canonical_prefill(spec, rows[0]))[0][0, -1]
    assert cosine(a, b) > 0.97, cosine(
        a, b
    )  # measured 0.985 (0.981 with the unscaled form; each to FP32: 0.99)
