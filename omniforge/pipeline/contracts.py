"""I/O contracts of the graphs a build holds (torch-free).

A stage's own contract is its ``StageSpec`` (inputs, outputs, dims). A variant of a stage whose
graph takes other tensors carries a ``Contract`` of its own in the manifest: the tensors with
their dtypes and named dims, which past input each present output aliases (``inplace``), what
each tensor is for (``slots``, so callers bind by purpose instead of spelling names) and the
internal tensors calibration reads (``taps``). The in-place LLM graph's names are defined here
once; the lowering writes them and every reader takes them from the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omniforge.errors import ManifestError
from omniforge.pipeline.spec import Dim, LlmGeometry, NamedTensors, StageSpec, TensorSpec


class Role(StrEnum):
    """What a stage variant is for."""

    CANONICAL = "canonical"  # the exported standard-ONNX FP32 graph: TensorRT's and any consumer's source
    ORT = "ort"  # the graph ONNX Runtime serves with the stage's contract (lowered, FP16 or INT8)
    ORT_INPLACE_LLM = "ort_inplace_llm"  # the LLM for ONNX Runtime: GQA with in-place K/V buffers
    QDQ = "qdq"  # explicit Q/DQ INT8 graph, zero points 0 (TensorRT's explicit INT8 source)
    # the LLM with DequantizeLinear weights: INT4 blocks (opset 21) / INT8 per channel
    WEIGHT_ONLY_DQ = "weight_only_dq"
    TENSORRT = "tensorrt_engine"  # a serialized TensorRT engine


class Slot(StrEnum):
    """Purposes of the in-place LLM graph's tensors (keys of its contract's ``slots``)."""

    EMBEDS = "embeds"  # (B, S, H) new rows
    SEQLENS = "seqlens_k"  # (B,) int32: past + S - 1 per sequence
    TOTAL = "total_sequence_length"  # () int32: the longest sequence after this step
    LOGITS = "logits"  # (B, 1, V) at the last row
    HIDDEN = "hidden_states"  # (B, S, H) final hidden states of the new rows


@dataclass(frozen=True)
class InPlace:
    """``output`` is written into the memory bound to ``input`` (a KV-cache buffer)."""

    input: str
    output: str


@dataclass(frozen=True)
class Contract(NamedTensors):
    """The tensors a graph takes and returns, and what they mean."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]
    inplace: tuple[InPlace, ...] = ()  # an LLM's K/V pairs: layer 0 key, layer 0 value, layer 1 key, ...
    slots: dict[str, str] = field(default_factory=dict)  # purpose -> tensor name
    taps: dict[str, str] = field(default_factory=dict)  # purpose -> internal tensor or initializer name

    def slot(self, purpose: str) -> str:
        if purpose not in self.slots:
            raise ManifestError(
                f"this graph's contract has no '{purpose}' tensor (it has: {sorted(self.slots)})"
            )
        return self.slots[purpose]

    def tap(self, purpose: str) -> str:
        if purpose not in self.taps:
            raise ManifestError(f"this graph's contract exposes no '{purpose}' tap")
        return self.taps[purpose]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "dims": [_dim_dict(d) for d in self.dims],
            "inplace": [{"input": p.input, "output": p.output} for p in self.inplace],
            "slots": dict(self.slots),
            "taps": dict(self.taps),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Contract:
        return cls(
            inputs=tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in d["inputs"]),
            outputs=tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in d["outputs"]),
            dims=tuple(Dim(**{**x, "sum_of": tuple(x.get("sum_of", ()))}) for x in d["dims"]),
            inplace=tuple(InPlace(**p) for p in d.get("inplace", ())),
            slots=dict(d.get("slots", {})),
            taps=dict(d.get("taps", {})),
        )

    @classmethod
    def of_stage(cls, spec: StageSpec) -> Contract:
        """The stage's own contract, as a ``Contract``."""
        return cls(spec.inputs, spec.outputs, spec.dims)


def _tensor_dict(t: TensorSpec) -> dict[str, Any]:
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "fill": t.fill,
        "low": t.low,
        "high": t.high,
    }


def _dim_dict(d: Dim) -> dict[str, Any]:
    return {"name": d.name, "min": d.min, "opt": d.opt, "max": d.max, "sum_of": list(d.sum_of)}


# ---- the in-place LLM graph for ONNX Runtime -------------------------------------------------------

LLM_LAYER_TAPS = {
    # activation taps: the inputs of the layer's linear groups
    "attn_in": "layers.{i}.norm1",  # RMSNorm output feeding the packed QKV projection
    "mlp_in": "layers.{i}.norm2",  # RMSNorm output feeding gate and up projections
    "down_in": "layers.{i}.act",  # SiLU(gate) * up, feeding the down projection
    # initializers: (in, out) weights and the norm gammas in front of them
    "qkv_weight": "layers.{i}.qkv.weight",
    "o_weight": "layers.{i}.o.weight",
    "gate_weight": "layers.{i}.gate.weight",
    "up_weight": "layers.{i}.up.weight",
    "down_weight": "layers.{i}.down.weight",
    "attn_norm_weight": "layers.{i}.input_layernorm.weight",
    "mlp_norm_weight": "layers.{i}.post_attention_layernorm.weight",
}


def lora_slot(layer: int, group: str) -> str:
    """The name of decoder layer ``layer``'s linear group ``group`` (qkv, o, gate, up, down) as a
    LoRA slot of the in-place graph (its inputs: ``lora.<slot>.A`` and ``.B``)."""
    return f"layers.{layer}.{group}"


def layer_tap(contract: Contract, layer: int, purpose: str) -> str:
    """The tensor of ``purpose`` (a key of ``LLM_LAYER_TAPS``) in decoder layer ``layer``."""
    return contract.tap(f"layers.{layer}.{purpose}")


def llm_inplace_contract(g: LlmGeometry, max_batch: int = 64) -> Contract:
    """The in-place LLM graph (``B`` sequences, ``S`` new rows, cache length ``C``):

    inputs_embeds (B, S, H) f32, seqlens_k (B,) i32 = past + S - 1, total_sequence_length () i32,
    past_key_values.{i}.key/value (B, kv_heads, C, head_dim) bound to the same memory as
    present.{i}.key/value; outputs logits (B, 1, V) at the last row and hidden_states (B, S, H).
    """
    f32, i32 = "float32", "int32"
    kv = ("batch", g.num_kv_heads, "cache_len", g.head_dim)
    inputs = [
        TensorSpec("inputs_embeds", f32, ("batch", "seq", g.hidden_size), high=0.05),
        TensorSpec("seqlens_k", i32, ("batch",), fill="randint", low=0, high=g.max_context),
        TensorSpec("total_sequence_length", i32, (), fill="randint", low=1, high=g.max_context + 1),
    ]
    outputs = [
        TensorSpec("logits", f32, ("batch", 1, g.vocab_size)),
        TensorSpec("hidden_states", f32, ("batch", "seq", g.hidden_size)),
    ]
    inplace = []
    for i in range(g.num_layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(TensorSpec(past, f32, kv))
            outputs.append(TensorSpec(present, f32, kv))
            inplace.append(InPlace(past, present))
    dims = (
        Dim("batch", 1, 1, max_batch),
        Dim("seq", 1, 1, g.max_context),
        Dim("cache_len", 1, g.max_context, g.max_context),
    )
    slots = {str(s): t.name for s, t in zip(Slot, (*inputs[:3], *outputs[:2]), strict=True)}
    taps = {
        f"layers.{i}.{purpose}": name.format(i=i)
        for i in range(g.num_layers)
        for purpose, name in LLM_LAYER_TAPS.items()
    }
    taps["final_norm_weight"] = "norm.weight"
    taps["lm_head_weight"] = "lm_head.weight"
    return Contract(tuple(inputs), tuple(outputs), dims, tuple(inplace), slots, taps)
