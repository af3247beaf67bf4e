"""Lower a LLaMA (or Qwen2/Qwen3) to an ONNX Runtime graph with fused ops and an in-place KV cache.

The canonical ``llm.onnx`` (standard ops, explicit cache concatenation) is what TensorRT and any
ONNX consumer read. For ONNX Runtime the runtime uses this second graph: one
``GroupQueryAttention`` per layer (rotary inside, past and present sharing one preallocated
buffer, so a decode step writes only the new token's K/V), ``SkipSimplifiedLayerNormalization``
for the residual + RMSNorm, packed QKV and no shape/mask plumbing: ~10 nodes a layer instead of
hundreds. ORT's transformer optimizer produces no GroupQueryAttention from traced graphs, and
ONNX Runtime GenAI's builder writes its own model format, so the graph is built here directly
from the HF weights. A linear layer's bias (Qwen2's q/k/v, LLaMA's ``attention_bias`` on q/k/v/o
and ``mlp_bias`` on gate/up/down) is one FP32 ``Add`` after its product, so it stays float when
the weights become INT4/INT8 ``MatMulNBits`` codes; Qwen3's per-head RMSNorm of q and k splits the
packed QKV, normalizes q and k over the head dimension (``SimplifiedLayerNormalization``) and
concatenates them back before the attention.

The graph's I/O names, in-place pairs and calibration taps come from its ``Contract``
(``omniforge.pipeline.contracts.llm_inplace_contract``), recorded in the manifest with the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from omniforge.pipeline.contracts import Contract, Slot, layer_tap
from omniforge.pipeline.spec import TensorSpec
from omniforge.runtime.adapters import lora_input_names

MS = "com.microsoft"


def _w(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


@dataclass(frozen=True)
class LlamaShape:
    """What the graph's structure depends on, read from an HF LLaMA/Qwen config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool = False  # Qwen2, LLaMA's attention_bias
    o_bias: bool = False  # LLaMA's attention_bias
    mlp_bias: bool = False  # LLaMA's mlp_bias: gate, up and down
    qk_norm: bool = False  # Qwen3: RMSNorm of each q and k head before rotary

    @classmethod
    def of(cls, c: Any, weights: LlamaWeights) -> LlamaShape:
        """The shape of HF config ``c``; which biases and norms there are is read off the first
        layer's tensors (configs spell them differently: Qwen2 has q/k/v biases without a flag)."""
        nh = c.num_attention_heads
        first = "model.layers.0."
        return cls(
            c.num_hidden_layers,
            nh,
            c.num_key_value_heads,
            getattr(c, "head_dim", None) or c.hidden_size // nh,
            float(c.rms_norm_eps),
            qkv_bias=f"{first}self_attn.q_proj.bias" in weights,
            o_bias=f"{first}self_attn.o_proj.bias" in weights,
            mlp_bias=f"{first}mlp.gate_proj.bias" in weights,
            qk_norm=f"{first}self_attn.q_norm.weight" in weights,
        )


class LlamaWeights(Protocol):
    """A LLaMA's tensors by their HF names (``model.layers.0.self_attn.q_proj.weight``, ...), one at
    a time, as FP32 arrays in HF's layouts (a linear layer's weight is (out, in))."""

    def tensor(self, name: str) -> np.ndarray: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def __contains__(self, name: str) -> bool: ...


class GraphSink(Protocol):
    """Where the graph's initializers go: ``add`` for any tensor, ``linear`` for a constant-weight
    linear layer ``y = x @ W.T`` whose weight ``W`` (N, K) is the concatenation of ``parts`` (HF
    names, (n_i, K) each) along N; ``linear`` returns the nodes computing it."""

    def add(self, name: str, arr: np.ndarray) -> str: ...

    def linear(self, name: str, parts: list[str], x: str, y: str) -> list[onnx.NodeProto]: ...


class InMemory:
    """Initializers held in the model proto; linear layers as ``MatMul`` with the (K, N) weight."""

    def __init__(self, weights: LlamaWeights) -> None:
        self.weights = weights
        self.initializers: list[onnx.TensorProto] = []

    def add(self, name: str, arr: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def linear(self, name: str, parts: list[str], x: str, y: str) -> list[onnx.NodeProto]:
        w = np.concatenate([self.weights.tensor(p) for p in parts], axis=0) if len(parts) > 1 else None
        self.add(name, (w if w is not None else self.weights.tensor(parts[0])).T)
        return [helper.make_node("MatMul", [x, name], [y])]


class TorchWeights:
    """A loaded causal LM's tensors (tied embeddings included)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = model.state_dict(keep_vars=True)

    def tensor(self, name: str) -> np.ndarray:
        return _w(self.state[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def __contains__(self, name: str) -> bool:
        return name in self.state


def rotary_tables(rotary: torch.nn.Module, max_context: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_context, head_dim / 2) of positions 0..max_context-1 from an HF rotary module."""
    with torch.no_grad():
        pos = torch.arange(max_context)[None]
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    return _w(cos[0, :, : head_dim // 2]), _w(sin[0, :, : head_dim // 2])


def build_llama_gqa(
    model: torch.nn.Module,
    max_context: int,
    contract: Contract,
    opset: int = 17,
    lora_slots: dict[str, tuple[int, int]] | None = None,
) -> onnx.ModelProto:
    """An ONNX Runtime graph of ``model`` (HF Llama/Qwen2/Qwen3ForCausalLM) for contexts up to
    ``max_context``, with the tensor names of ``contract``; ``lora_slots`` ((K, N) by ``layers.{i}.{group}``) get
    a low-rank branch each, its A/B optional graph inputs (see ``omniforge.export.lora``)."""
    weights = TorchWeights(model)
    sink = InMemory(weights)
    shape = LlamaShape.of(model.config, weights)
    tables = rotary_tables(model.model.rotary_emb, max_context, shape.head_dim)
    nodes = llama_gqa_nodes(weights, shape, tables, contract, sink, lora_slots=lora_slots)
    return llama_gqa_model(nodes, sink.initializers, contract, opset, lora_slots)


def llama_gqa_model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    contract: Contract,
    opset: int = 17,
    lora_slots: dict[str, tuple[int, int]] | None = None,
) -> onnx.ModelProto:
    """The graph's model proto: ``nodes`` over ``initializers``, with ``contract``'s inputs and
    outputs, and the optional A/B inputs of ``lora_slots``."""
    inputs = [_value_info(t) for t in contract.inputs]
    for slot, (k, n) in (lora_slots or {}).items():
        a, b = lora_input_names(slot)
        inputs.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [None, k, None]))
        inputs.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [None, None, n]))
    outputs = [_value_info(t) for t in contract.outputs]
    graph = helper.make_graph(nodes, "llama_gqa", inputs, outputs, initializers)
    model_proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
        producer_name="omniforge",
    )
    model_proto.ir_version = 8
    return model_proto


def llama_gqa_nodes(
    weights: LlamaWeights,
    shape: LlamaShape,
    rotary: tuple[np.ndarray, np.ndarray],
    contract: Contract,
    sink: GraphSink,
    on_layer: Callable[[int], None] | None = None,
    lora_slots: dict[str, tuple[int, int]] | None = None,
) -> list[onnx.NodeProto]:
    """The in-place graph's nodes, layer by layer; initializers go to ``sink`` as they are made
    (``on_layer(i)`` after layer ``i``'s), each weight read from ``weights`` when it is needed.
    Each linear group named in ``lora_slots`` gets a low-rank branch over optional inputs."""
    io = contract.slots
    lora_slots = lora_slots or {}

    def linear(tap_name: str, parts: list[str], x: str, y: str, bias: bool) -> list[onnx.NodeProto]:
        """``y = x @ W`` (+ the low-rank branch of the slot named ``y``, ``layers.{i}.{group}``)
        (+ the parts' HF biases, concatenated, where ``bias``)."""
        z = f"{y}.nobias" if bias else y
        if y in lora_slots:
            nodes = sink.linear(tap_name, parts, x, f"{z}.base")
            nodes += _lora_branch(y, lora_slots[y], x, f"{z}.base", z, sink.add)
        else:
            nodes = sink.linear(tap_name, parts, x, z)
        if bias:
            b = np.concatenate([weights.tensor(n.removesuffix("weight") + "bias") for n in parts])
            nodes.append(helper.make_node("Add", [z, sink.add(f"{y}.bias", b)], [y]))
        return nodes

    embeds, seqlens, total = io[Slot.EMBEDS], io[Slot.SEQLENS], io[Slot.TOTAL]

    def tap(i: int, purpose: str) -> str:
        return layer_tap(contract, i, purpose)

    nh, kvh, hd, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.eps
    nodes: list[onnx.NodeProto] = []
    init = sink.add

    # rotary tables for positions 0..max_context-1, from the model's own rotary module
    init("cos_cache", rotary[0])
    init("sin_cache", rotary[1])
    # ORT's GroupQueryAttention applies rotary itself only for head sizes that are multiples of 16;
    # other sizes get the same rotation from standard ops before the attention.
    fused_rotary = hd % 16 == 0
    if not fused_rotary:
        nodes.extend(_rotary_tables(init, embeds, seqlens))

    x, residual = embeds, ""
    for i in range(shape.num_layers):
        hf = f"model.layers.{i}."
        p = f"layers.{i}"
        g_in = init(tap(i, "attn_norm_weight"), weights.tensor(hf + "input_layernorm.weight"))
        norm1, norm2, act = tap(i, "attn_in"), tap(i, "mlp_in"), tap(i, "down_in")
        if i == 0:
            nodes.append(
                helper.make_node("SimplifiedLayerNormalization", [x, g_in], [norm1], epsilon=eps, axis=-1)
            )
            residual = x
        else:
            nodes.append(
                helper.make_node(
                    "SkipSimplifiedLayerNormalization",
                    [x, residual, g_in],
                    [norm1, "", "", f"{p}.res1"],
                    domain=MS,
                    epsilon=eps,
                )
            )
            residual = f"{p}.res1"
        attn = [f"{hf}self_attn.{k}_proj.weight" for k in "qkv"]
        nodes += linear(tap(i, "qkv_weight"), attn, norm1, f"{p}.qkv", shape.qkv_bias)
        last = f"{p}.qkv"
        if fused_rotary and not shape.qk_norm:
            qkv_in, rot = [last, "", ""], ["cos_cache", "sin_cache"]
        else:
            split = init(f"{p}.qkv.split", np.array([nh * hd, kvh * hd, kvh * hd], np.int64))
            nodes.append(helper.make_node("Split", [last, split], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1))
            q, k = f"{p}.q", f"{p}.k"
            if shape.qk_norm:
                for name, heads in (("q", nh), ("k", kvh)):
                    gamma = init(
                        f"{p}.{name}_norm.weight", weights.tensor(f"{hf}self_attn.{name}_norm.weight")
                    )
                    nodes.extend(_head_norm(f"{p}.{name}", f"{p}.{name}_n", heads, hd, gamma, eps, init))
                q, k = f"{p}.q_n", f"{p}.k_n"
            if fused_rotary:
                nodes.append(helper.make_node("Concat", [q, k, f"{p}.v"], [f"{p}.qkv_n"], axis=-1))
                qkv_in, rot = [f"{p}.qkv_n", "", ""], ["cos_cache", "sin_cache"]
            else:
                nodes.extend(_rotate(q, f"{p}.q_rot", nh, hd, init))
                nodes.extend(_rotate(k, f"{p}.k_rot", kvh, hd, init))
                qkv_in, rot = [f"{p}.q_rot", f"{p}.k_rot", f"{p}.v"], []
        k_pair, v_pair = contract.inplace[2 * i], contract.inplace[2 * i + 1]
        cache = [k_pair.input, v_pair.input, seqlens, total]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [*qkv_in, *cache, *rot],
                [f"{p}.attn", k_pair.output, v_pair.output],
                domain=MS,
                num_heads=nh,
                kv_num_heads=kvh,
                do_rotary=int(fused_rotary),
                rotary_interleaved=0,
                scale=float(hd**-0.5),
            )
        )
        o_proj = [f"{hf}self_attn.o_proj.weight"]
        nodes += linear(tap(i, "o_weight"), o_proj, f"{p}.attn", f"{p}.o", shape.o_bias)
        g_post = init(tap(i, "mlp_norm_weight"), weights.tensor(hf + "post_attention_layernorm.weight"))
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [f"{p}.o", residual, g_post],
                [norm2, "", "", f"{p}.res2"],
                domain=MS,
                epsilon=eps,
            )
        )
        residual = f"{p}.res2"
        mlp = f"{hf}mlp."
        nodes += linear(tap(i, "gate_weight"), [mlp + "gate_proj.weight"], norm2, f"{p}.gate", shape.mlp_bias)
        nodes += linear(tap(i, "up_weight"), [mlp + "up_proj.weight"], norm2, f"{p}.up", shape.mlp_bias)
        nodes += [
            helper.make_node("Sigmoid", [f"{p}.gate"], [f"{p}.gate_sig"]),
            helper.make_node("Mul", [f"{p}.gate", f"{p}.gate_sig"], [f"{p}.silu"]),
            helper.make_node("Mul", [f"{p}.silu", f"{p}.up"], [act]),
        ]
        nodes += linear(tap(i, "down_weight"), [mlp + "down_proj.weight"], act, f"{p}.down", shape.mlp_bias)
        x = f"{p}.down"
        if on_layer is not None:
            on_layer(i)
    g_f = init(contract.tap("final_norm_weight"), weights.tensor("model.norm.weight"))
    nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, g_f],
            [io[Slot.HIDDEN], "", "", ""],
            domain=MS,
            epsilon=eps,
        )
    )
    init("last_index", np.array([-1], dtype=np.int64))
    nodes.append(helper.make_node("Gather", [io[Slot.HIDDEN], "last_index"], ["last_hidden"], axis=1))
    nodes += sink.linear(contract.tap("lm_head_weight"), ["lm_head.weight"], "last_hidden", io[Slot.LOGITS])
    return nodes


def _lora_branch(
    slot: str, kn: tuple[int, int], x: str, base: str, y: str, init: Callable[[str, np.ndarray], str]
) -> list[onnx.NodeProto]:
    """``y = base + (x @ A) @ B``; A and B default to rank 0 (the branch adds zeros)."""
    k, n = kn
    a, b = lora_input_names(slot)
    init(a, np.zeros((1, k, 0), np.float32))
    init(b, np.zeros((1, 0, n), np.float32))
    mk = helper.make_node
    return [
        mk("MatMul", [x, a], [f"lora.{slot}.xa"], name=f"lora.{slot}.down"),
        mk("MatMul", [f"lora.{slot}.xa", b], [f"lora.{slot}.delta"], name=f"lora.{slot}.up"),
        mk("Add", [base, f"lora.{slot}.delta"], [y], name=f"lora.{slot}.add"),
    ]


def _value_info(t: TensorSpec) -> onnx.ValueInfoProto:
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    return helper.make_tensor_value_info(t.name, dtype, list(t.shape))


def _rotary_tables(init, embeds: str, seqlens: str) -> list[onnx.NodeProto]:
    """cos/sin rows for the new tokens' positions: past_len + arange(S), with past_len = seqlens_k + 1 - S."""
    mk = helper.make_node
    one = init("rot.one", np.array(1, np.int64))
    zero = init("rot.zero", np.array(0, np.int64))
    axis1 = init("rot.axis1", np.array([1], np.int64))
    axis0 = init("rot.axis0", np.array([0], np.int64))
    axis2 = init("rot.axis2", np.array([2], np.int64))
    return [
        mk("Shape", [embeds], ["rot.shape"]),
        mk("Gather", ["rot.shape", one], ["rot.seq"], axis=0),
        mk("Cast", [seqlens], ["rot.seqlens64"], to=TensorProto.INT64),
        mk("Sub", ["rot.seqlens64", "rot.seq"], ["rot.last_minus"]),
        mk("Add", ["rot.last_minus", one], ["rot.past"]),  # (B,)
        mk("Range", [zero, "rot.seq", one], ["rot.arange"]),  # (S,)
        mk("Unsqueeze", ["rot.past", axis1], ["rot.past_col"]),  # (B, 1)
        mk("Unsqueeze", ["rot.arange", axis0], ["rot.arange_row"]),  # (1, S)
        mk("Add", ["rot.past_col", "rot.arange_row"], ["rot.positions"]),  # (B, S)
        mk("Gather", ["cos_cache", "rot.positions"], ["rot.cos3"], axis=0),  # (B, S, hd/2)
        mk("Gather", ["sin_cache", "rot.positions"], ["rot.sin3"], axis=0),
        mk("Unsqueeze", ["rot.cos3", axis2], ["rot.cos"]),  # (B, S, 1, hd/2)
        mk("Unsqueeze", ["rot.sin3", axis2], ["rot.sin"]),
    ]


def _head_norm(
    x: str, out: str, heads: int, hd: int, gamma: str, eps: float, init: Callable[[str, np.ndarray], str]
) -> list[onnx.NodeProto]:
    """RMSNorm of each head of (B, S, heads * hd) over its ``hd`` values, scaled by ``gamma`` (hd,)."""
    mk = helper.make_node
    shape4 = init(f"{x}.norm_shape4", np.array([0, 0, heads, hd], np.int64))
    shape3 = init(f"{x}.norm_shape3", np.array([0, 0, heads * hd], np.int64))
    return [
        mk("Reshape", [x, shape4], [f"{x}.heads"]),
        mk("SimplifiedLayerNormalization", [f"{x}.heads", gamma], [f"{x}.normed"], epsilon=eps, axis=-1),
        mk("Reshape", [f"{x}.normed", shape3], [out]),
    ]


def _rotate(x: str, out: str, heads: int, hd: int, init) -> list[onnx.NodeProto]:
    """LLaMA's rotate-half rotary embedding of (B, S, heads * hd) with the tables above."""
    mk = helper.make_node
    shape4 = init(f"{x}.shape4", np.array([0, 0, heads, hd], np.int64))
    shape3 = init(f"{x}.shape3", np.array([0, 0, heads * hd], np.int64))
    halves = init(f"{x}.halves", np.array([hd // 2, hd // 2], np.int64))
    return [
        mk("Reshape", [x, shape4], [f"{x}.4d"]),
        mk("Split", [f"{x}.4d", halves], [f"{x}.x1", f"{x}.x2"], axis=-1),
        mk("Mul", [f"{x}.x1", "rot.cos"], [f"{x}.x1c"]),
        mk("Mul", [f"{x}.x2", "rot.sin"], [f"{x}.x2s"]),
        mk("Sub", [f"{x}.x1c", f"{x}.x2s"], [f"{x}.r1"]),
        mk("Mul", [f"{x}.x2", "rot.cos"], [f"{x}.x2c"]),
        mk("Mul", [f"{x}.x1", "rot.sin"], [f"{x}.x1s"]),
        mk("Add", [f"{x}.x2c", f"{x}.x1s"], [f"{x}.r2"]),
        mk("Concat", [f"{x}.r1", f"{x}.r2"], [f"{x}.r4d"], axis=-1),
        mk("Reshape", [f"{x}.r4d", shape3], [out]),
    ]
