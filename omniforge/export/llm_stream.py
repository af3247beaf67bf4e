"""The LLM stage written layer by layer from an HF LLaMA, Qwen2 or Qwen3 folder's safetensors shards.

The non-streaming export loads the whole LLM into PyTorch in FP32 and traces it (28 GB for a 7B
model). This writer never holds more than a few tensors: each weight is read from its shard when
the graph needs it (``SafetensorsReader``: BF16, FP16 or FP32, read with ``pread``, never mapped,
so the process's resident memory holds only what it is working on), converted to FP32 (a LoRA
adapter merged into it as PEFT merges it), quantized block-wise where asked, appended to the
graph's one external-data file, and dropped. The model proto holds no large initializer.

What it writes is the in-place ONNX Runtime graph the runtime serves, with the node structure of
``llm_ort.build_llama_gqa`` (one builder, ``llama_gqa_nodes``, writes both), in FP32 or as
ONNX Runtime's ``MatMulNBits`` weight-only form (INT4/INT8, round-to-nearest, codes from ONNX
Runtime's own quantization kernel, so they equal ``weight_only.quantize_weights``' byte for
byte). ``stream_llm_build`` makes a whole LLM-only build folder of it; its checks
(``llm_stream_check``) compare the streamed graph with a layer-by-layer numpy reference that
reads the shards the same way.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omniforge.errors import ConfigError, ExportError, ModelNotFoundError
from omniforge.runtime.engine import available_memory

# safetensors dtype -> (numpy dtype of the stored bytes, converter to float32)
_DTYPES: dict[str, np.dtype] = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
ALIGN = 4096  # external tensors start on a page boundary, so ONNX Runtime can map them
INLINE_BYTES = 1024  # tensors smaller than this stay in the model proto
CHUNK_BYTES = 64 << 20  # rows of a weight quantized (or transposed) at once


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        out = raw.astype(np.uint32)
        out <<= 16
        return out.view(np.float32)
    return raw.astype(np.float32)


@dataclass(frozen=True)
class _Entry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the shard
    stop: int


class SafetensorsReader:
    """The tensors of a folder's ``*.safetensors`` shards (or one file), read one at a time.

    The shards' headers are parsed here (8-byte length, JSON) and each tensor's bytes are read
    with ``os.pread`` into a fresh array: nothing is memory-mapped, so reading a 10 GB shard
    leaves none of it resident in the process."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"no .safetensors files in '{path}'")
        self.entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            for name, entry in self._header(f).items():
                if name in self.entries:
                    raise ConfigError(
                        f"tensor '{name}' is stored twice ({self.entries[name].shard.name}, {f.name})"
                    )
                self.entries[name] = entry
        self.bytes_read = 0

    def _header(self, f: Path) -> dict[str, _Entry]:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ConfigError(f"'{f}' is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ConfigError(f"'{f}' is not a safetensors file (header length {n})")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"'{f}' is not a safetensors file (its header is not JSON)") from None
        out: dict[str, _Entry] = {}
        for name, d in header.items():
            if name == "__metadata__":
                self.metadata.update(d or {})
                continue
            dtype = d.get("dtype")
            if dtype not in _DTYPES:
                raise ConfigError(
                    f"'{f.name}' stores '{name}' as {dtype}; the streaming build reads BF16, F16 and F32"
                )
            begin, end = (int(x) for x in d["data_offsets"])
            shape = tuple(int(s) for s in d["shape"])
            if (
                end - begin != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
                or 8 + n + end > size
            ):
                raise ConfigError(f"'{f.name}' is damaged: '{name}' does not fit its shape or the file")
            out[name] = _Entry(f, dtype, shape, 8 + n + begin, 8 + n + end)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def _entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise ModelNotFoundError(f"the model's shards hold no tensor '{name}'")
        return self.entries[name]

    def _read(self, e: _Entry, start: int, count: int) -> np.ndarray:
        """``count`` elements of ``e`` from element ``start``, as stored."""
        dt = _DTYPES[e.dtype]
        buf = np.empty(count, dt)
        view = memoryview(buf.view(np.uint8))
        pos, done = e.start + start * dt.itemsize, 0
        fd = os.open(e.shard, os.O_RDONLY)
        try:
            while done < len(view):
                n = os.preadv(fd, [view[done:]], pos + done)
                if n <= 0:
                    raise ExportError(f"'{e.shard.name}' ended while reading a tensor")
                done += n
        finally:
            os.close(fd)
        self.bytes_read += done
        return buf

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor as FP32."""
        e = self._entry(name)
        count = int(np.prod(e.shape, dtype=np.int64))
        return _to_f32(self._read(e, 0, count), e.dtype).reshape(e.shape)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of a 2-D tensor as FP32 (an embedding lookup without reading the table)."""
        e = self._entry(name)
        width = int(np.prod(e.shape[1:], dtype=np.int64))
        out = [_to_f32(self._read(e, int(i) * width, width), e.dtype) for i in np.asarray(index).ravel()]
        return (
            np.stack(out).reshape(*np.shape(index), *e.shape[1:])
            if out
            else np.zeros((0, *e.shape[1:]), np.float32)
        )


class LoraAdapter:
    """A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) merged into
    weights one at a time, as ``PeftModel.merge_and_unload`` merges it: ``W + (B @ A) * scaling``."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        cfg_path = folder / "adapter_config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"'{folder}' is not a PEFT adapter folder (no adapter_config.json)")
        c = json.loads(cfg_path.read_text())
        unsupported = [
            what
            for what, bad in (
                ("a non-LoRA adapter", c.get("peft_type", "LORA") != "LORA"),
                ("DoRA", c.get("use_dora")),
                ("per-module ranks or alphas", c.get("rank_pattern") or c.get("alpha_pattern")),
                ("fan_in_fan_out", c.get("fan_in_fan_out")),
                ("trained biases", c.get("bias", "none") != "none" or c.get("lora_bias")),
                ("modules saved whole", c.get("modules_to_save")),
            )
            if bad
        ]
        if unsupported:
            raise ConfigError(f"omniforge takes plain LoRA adapters; '{folder}' has {unsupported[0]}")
        r = float(c["r"])
        self.scaling = float(c["lora_alpha"]) / (r**0.5 if c.get("use_rslora") else r)
        files = sorted(folder.glob("adapter_model*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"'{folder}' holds no adapter_model.safetensors")
        self.reader = SafetensorsReader(files[0])
        self.pairs: dict[str, tuple[str, str]] = {}
        for name in self.reader.names():
            if name.endswith(".lora_A.weight") or name.endswith(".lora_A.default.weight"):
                base = name.split(".lora_A.")[0].removeprefix("base_model.model.")
                b = name.replace(".lora_A.", ".lora_B.")
                self.pairs[base + ".weight"] = (name, b)

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The low-rank pair of the linear weight ``name`` (HF name): A (r, in) and B (out, r) with
        the scaling folded into B, FP32; None where the adapter does not target it."""
        if name not in self.pairs:
            return None
        a, b = (self.reader.tensor(n) for n in self.pairs[name])
        return a, b * np.float32(self.scaling)

    def merge(self, name: str, w: np.ndarray) -> np.ndarray:
        if name not in self.pairs:
            return w
        import torch  # the delta is computed as PEFT computes it, so merged weights match bit for bit

        a, b = (torch.from_numpy(self.reader.tensor(n)) for n in self.pairs[name])
        merged = torch.from_numpy(np.ascontiguousarray(w))
        merged += (b @ a) * self.scaling
        return merged.numpy()


class LlamaFolder:
    """An HF LLaMA/Qwen folder's weights by HF name, one tensor at a time (``llm_ort.LlamaWeights``),
    with a LoRA adapter merged in where given; a tied LM head reads the embedding table."""

    EMBED = "model.embed_tokens.weight"
    HEAD = "lm_head.weight"

    def __init__(self, folder: Path, adapter: Path | None = None) -> None:
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.reader = SafetensorsReader(self.folder)
        self.adapter = LoraAdapter(adapter) if adapter is not None else None
        self.tied = self.HEAD not in self.reader or bool(self.config.get("tie_word_embeddings"))

    def _name(self, name: str) -> str:
        return self.EMBED if name == self.HEAD and self.tied else name

    def tensor(self, name: str) -> np.ndarray:
        w = self.reader.tensor(self._name(name))
        return self.adapter.merge(name, w) if self.adapter is not None else w

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._name(name))

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.reader

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.reader.rows(self.EMBED, ids)

    def source_dtypes(self) -> dict[str, int]:
        """How many tensors are stored in each dtype."""
        out: dict[str, int] = {}
        for n in self.reader.names():
            d = self.reader.dtype(n)
            out[d] = out.get(d, 0) + 1
        return out

    def parameter_count(self) -> int:
        return sum(int(np.prod(self.reader.shape(n), dtype=np.int64)) for n in self.reader.names())

    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder)


# ---- weight-only codes (ONNX Runtime's MatMulNBits layout) --------------------------------------


@dataclass(frozen=True)
class NBits:
    """``MatMulNBits`` settings: bits, block size (rows of K per scale), symmetry, accuracy level."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"weight-only quantization takes 4 or 8 bits, got {self.bits}")

    @property
    def blob(self) -> int:
        return self.block_size * self.bits // 8

    def blocks(self, k: int) -> int:
        return -(-k // self.block_size)


def nbits_codes(w: np.ndarray, q: NBits) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed (n, k_blocks, blob) uint8, scales (n, k_blocks) f32, zero points or None) of the HF
    weight rows ``w`` (n, K), by ONNX Runtime's own kernel (what ``MatMulNBitsQuantizer`` calls);
    rows are independent, so a weight quantized in row chunks gives the same bytes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    kb, kpack = q.blocks(k), 8 // q.bits
    wt = np.zeros((kb * q.block_size, n), np.float32)  # (K padded, n): the layout the kernel reads
    wt[:k] = w.T
    packed = np.zeros((n, kb, q.blob), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zero = np.zeros((n, -(-kb // kpack)), np.uint8)
    fn = quantize_matmul_4bits if q.bits == 4 else quantize_matmul_8bits
    fn(packed, wt, scales, zero, q.block_size, n, k, q.symmetric)
    return packed, scales, (None if q.symmetric else zero)


def nbits_dequantize(
    packed: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, q: NBits, k: int
) -> np.ndarray:
    """The (n, K) weight rows ``nbits_codes`` stand for (the weights ``MatMulNBits`` multiplies by)."""
    n, kb, _ = packed.shape
    if q.bits == 4:
        codes = np.empty((n, kb, q.block_size), np.uint8)
        codes[..., 0::2] = packed & 0x0F
        codes[..., 1::2] = packed >> 4
    else:
        codes = packed
    if zero is None:
        zp = np.full((n, kb), 2 ** (q.bits - 1), np.float32)
    elif q.bits == 4:
        zp = np.stack([zero & 0x0F, zero >> 4], axis=-1).reshape(n, -1)[:, :kb].astype(np.float32)
    else:
        zp = zero[:, :kb].astype(np.float32)
    w = (codes.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(n, kb * q.block_size)[:, :k]


def _row_chunks(n: int, k: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // (4 * max(k, 1)))
    for r in range(0, n, step):
        yield slice(r, min(r + step, n))


# ---- writing -----------------------------------------------------------------------------------


class ExternalData:
    """One external-data file, written append-only: each tensor's bytes go to the file as they
    are produced (page-aligned), and the proto keeps only their location."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def _tensor(
        self, name: str, data_type: int, dims: tuple[int, ...], offset: int, length: int
    ) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = key, value
        return t

    def begin(self) -> int:
        pad = (-self.offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def write(self, arr: np.ndarray) -> None:
        b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        self.file.write(memoryview(b))
        self.offset += b.size

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        """``arr`` as an initializer: inline when small, else appended to the file."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(arr, name)
        start = self.begin()
        self.write(arr)
        dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
        return self._tensor(name, dtype, arr.shape, start, arr.nbytes)

    def close(self) -> None:
        self.file.close()


class StreamSink:
    """``llm_ort.GraphSink`` writing to ``ExternalData``: linear layers as FP32 ``MatMul`` with
    the (K, N) weight, or ``MatMulNBits`` (``nbits`` given) quantized row chunk by row chunk."""

    def __init__(self, weights, data: ExternalData, nbits: NBits | None = None, log=None) -> None:
        self.weights, self.data, self.nbits = weights, data, nbits
        self.initializers: list[TensorProto] = []
        self.log = log

    def add(self, name: str, arr: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, arr))
        return name

    def linear(self, name: str, parts: list[str], x: str, y: str) -> list[onnx.NodeProto]:
        if self.nbits is None:
            w = (
                np.concatenate([self.weights.tensor(p) for p in parts])
                if len(parts) > 1
                else self.weights.tensor(parts[0])
            )
            self.add(name, w.T)
            return [helper.make_node("MatMul", [x, name], [y])]
        q = self.nbits
        k = self.weights.shape(parts[0])[1]
        n = sum(self.weights.shape(p)[0] for p in parts)
        start = self.data.begin()
        scales, zeros = [], []
        for p in parts:
            w = self.weights.tensor(p)
            for rows in _row_chunks(len(w), k):
                packed, s, z = nbits_codes(w[rows], q)
                self.data.write(packed)
                scales.append(s)
                zeros.append(z)
            del w
        length = n * q.blocks(k) * q.blob
        codes = f"{name}_Q{q.bits}"
        self.initializers.append(
            self.data._tensor(codes, TensorProto.UINT8, (n, q.blocks(k), q.blob), start, length)
        )
        self.add(f"{name}_scales", np.concatenate(scales))
        inputs = [x, codes, f"{name}_scales"]
        if not q.symmetric:
            self.add(f"{name}_zero_points", np.concatenate(zeros))
            inputs.append(f"{name}_zero_points")
        attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size}
        if q.accuracy_level:
            attrs["accuracy_level"] = q.accuracy_level
        return [helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", **attrs)]


@dataclass
class WrittenGraph:
    path: Path
    data: Path
    nodes: int
    data_bytes: int
    seconds: float


def write_llm_graph(
    weights: LlamaFolder,
    max_context: int,
    contract,
    path: Path,
    nbits: NBits | None = None,
    log: Callable[[str], None] | None = None,
    lora_slots: dict[str, tuple[int, int]] | None = None,
) -> WrittenGraph:
    """The in-place graph of ``weights`` at ``path`` (its tensors in ``<path>.data``), FP32 or
    ``MatMulNBits`` (``nbits``), written layer by layer; ``lora_slots``: the low-rank branches of
    adapters switched at run time (FP32, their weights bound per request)."""
    import time

    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from omniforge.export.llm_ort import LlamaShape, llama_gqa_model, llama_gqa_nodes, rotary_tables

    t0 = time.perf_counter()
    conf = weights.hf_config()
    shape = LlamaShape.of(conf, weights)
    with torch.device("cpu"):
        tables = rotary_tables(LlamaRotaryEmbedding(config=conf), max_context, shape.head_dim)
    data = ExternalData(Path(f"{path}.data"))
    sink = StreamSink(weights, data, nbits)

    def on_layer(i: int) -> None:
        if log is not None:
            log(
                f"llm: layer {i + 1}/{shape.num_layers} written ({data.offset / 2**30:.2f} GiB, "
                f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB)"
            )

    try:
        nodes = llama_gqa_nodes(weights, shape, tables, contract, sink, on_layer, lora_slots)
    finally:
        data.close()
    model = llama_gqa_model(nodes, sink.initializers, contract, lora_slots=lora_slots)
    from omniforge import __version__

    model.producer_version = __version__
    path.write_bytes(model.SerializeToString())
    return WrittenGraph(path, data.path, len(nodes), data.offset, time.perf_counter() - t0)


def embedding_graph(table: np.ndarray, spec) -> onnx.ModelProto:
    """The token-embedding stage: one ``Gather`` of the FP32 table, inline (the runtime reads the
    table from the graph for its numpy lookup)."""
    (ids,), (rows,) = spec.input_names, spec.output_names
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", ids], [rows], axis=0)],
        "token_embedding",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(rows, TensorProto.FLOAT, ["batch", "seq", table.shape[1]])],
        [numpy_helper.from_array(np.ascontiguousarray(table, np.float32), "embed_tokens.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="omniforge")
    model.ir_version = 8
    return model


# ---- the build ----------------------------------------------------------------------------------

STREAM_PRECISIONS = ("fp32", "int8", "int4")
# the non-streaming build's peak memory in multiples of the LLM's FP32 weights (the PyTorch model,
# the traced graph, parity sessions, then quantization of the FP32 graphs): 4.9x measured for a
# 1.1B LLaMA's export + INT4 build (20.2 GiB; tests/test_llm_stream.py's slow test)
NON_STREAMING_FACTOR = 5.0


def fp32_bytes(folder: Path) -> int:
    """The FP32 size of an HF folder's weights, from its shards' headers (nothing is read)."""
    return 4 * LlamaFolder(folder).parameter_count()


def fits_in_memory(folder: Path, factor: float = NON_STREAMING_FACTOR) -> bool:
    """Whether the non-streaming export of this LLM (``factor`` x its FP32 weights) fits in the
    memory available now."""
    return factor * fp32_bytes(folder) <= available_memory()


def nbits_of(weight_only) -> NBits:
    """``NBits`` of a ``weight_only.WeightOnlyConfig``; AWQ and GPTQ are refused (one sentence)."""
    if weight_only.method != "rtn":
        raise ConfigError(
            f"the streaming LLM build quantizes by round-to-nearest only: {weight_only.method.upper()} needs "
            "calibration activations through the whole model; use --method rtn, or build on a machine where "
            "the FP32 model fits in memory"
        )
    return NBits(weight_only.bits, weight_only.block_size, weight_only.symmetric, weight_only.accuracy_level)


def stream_llm_build(
    model: str | Path,
    out: str | Path,
    precision: str = "int4",
    weight_only=None,
    canonical: bool | None = None,
    threads: int = 2,
    log: Callable[[str], None] = print,
):
    """Write an LLM-only build of ``model``'s LLM (token_embedding + llm) into ``out``, replaced
    atomically; see ``stream_llm_build_into``."""
    from omniforge.pipeline.atomic import atomic_folder

    out = Path(out)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise ExportError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        return stream_llm_build_into(model, tmp, precision, weight_only, canonical, threads, log)


def stream_llm_build_into(
    model: str | Path,
    build: Path,
    precision: str = "int4",
    weight_only=None,
    canonical: bool | None = None,
    threads: int = 2,
    log: Callable[[str], None] = print,
):
    """The LLM stages of ``model`` (an HF LLM folder, or a NExT-GPT folder's LLM with its merged
    adapter) written from the shards into the build folder ``build``: the token embedding (FP32,
    plus its INT8 form when quantized) and the in-place LLM graph the runtime serves, FP32 or
    ``MatMulNBits`` INT4/INT8 (``weight_only``: a ``WeightOnlyConfig``, RTN), each checked against
    the layer-by-layer reference. ``canonical``: also export the traced FP32 canonical graph
    (needs the whole model in memory; None: when ``fits_in_memory``); without it the stage's
    canonical variant names the in-place graph and the manifest says why. Returns (manifest,
    report); the report (``stream.json``) holds the peak RSS of the build."""
    import time

    from omniforge.calibration.metrics import cosine, snr_db
    from omniforge.calibration.quantize import StageQuantization, quantize_table
    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_embedding
    from omniforge.export.exporter import (
        StageReport,
        copy_runtime_files,
        save_model,
        tool_versions,
        write_report,
    )
    from omniforge.export.llm_ort import LlamaShape, rotary_tables
    from omniforge.export.llm_stream_check import check_streamed
    from omniforge.export.parity import ParityResult
    from omniforge.pipeline.contracts import Role, llm_inplace_contract
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.manifest import (
        Manifest,
        StageBuild,
        Variant,
        atomic_write_text,
        canonical_stage,
        collect_artifacts,
        write_manifest,
    )
    from omniforge.pipeline.model_config import load_model_config

    if precision not in STREAM_PRECISIONS:
        raise ConfigError(f"the streaming LLM build writes {', '.join(STREAM_PRECISIONS)}, not '{precision}'")
    t_start = time.perf_counter()
    cfg = load_model_config(model)
    spec = describe(cfg).select(["token_embedding", "llm"])
    emb_spec, llm_spec = spec.stage("token_embedding"), spec.stage("llm")
    g = llm_spec.llm
    assert g is not None
    adapter = cfg.adapters[cfg.merge_adapter] if cfg.merge_adapter else None
    weights = LlamaFolder(cfg.llm, adapter)
    quantized = precision != "fp32"
    wcfg = weight_only or WeightOnlyConfig(bits=4 if precision == "int4" else 8)
    if quantized and wcfg.bits != (4 if precision == "int4" else 8):
        raise ConfigError(f"precision {precision} and {wcfg.bits}-bit weights disagree")
    nbits = nbits_of(wcfg) if quantized else None
    size32 = 4 * weights.parameter_count()
    if canonical is None:
        canonical = fits_in_memory(cfg.llm)
    build = Path(build)
    (build / "stages").mkdir(parents=True, exist_ok=True)
    report: dict = {
        "model": str(cfg.llm),
        "adapter": str(adapter) if adapter else None,
        "source_dtypes": weights.source_dtypes(),
        "parameters": weights.parameter_count(),
        "fp32_bytes": size32,
        "available_memory_bytes": available_memory(),
        "precision": precision,
        "seconds": {},
        "peak_rss_bytes": {},
    }
    reports: list[StageReport] = []
    quant_rows: list[StageQuantization] = []
    stages: dict[str, StageBuild] = {}

    def phase(name: str, t0: float) -> None:
        report["seconds"][name] = round(time.perf_counter() - t0, 3)
        report["peak_rss_bytes"][name] = peak_rss_bytes()
        log(f"{name}: {time.perf_counter() - t0:.1f}s, peak RSS so far {peak_rss_bytes() / 2**30:.2f} GiB")

    # -- token embedding: the FP32 table (and INT8 rows) -----------------------------------------
    t0 = time.perf_counter()
    table = weights.tensor(LlamaFolder.EMBED)
    emb_rel = "stages/token_embedding.onnx"
    emb_model = embedding_graph(table, emb_spec)
    save_model(emb_model, build / emb_rel)
    emb_data = (f"{emb_rel}.data",) if (build / f"{emb_rel}.data").exists() else ()
    emb_sb = canonical_stage(emb_rel, emb_data, opset=17, nodes=1)
    checked = emb_spec.parity_points()
    points = [emb_spec.sample_inputs(p, seed=200 + i) for i, p in enumerate(checked)]
    parity = []
    for point, feeds in zip(checked, points, strict=True):
        ids = feeds[emb_spec.input_names[0]]
        parity.append(_embedding_parity(build / emb_rel, emb_spec, point, feeds, table[ids], ParityResult))
    reports.append(
        StageReport(
            emb_spec.name, 0.0, 1, sum((build / p).stat().st_size for p in (emb_rel, *emb_data)), parity
        )
    )
    if quantized:
        q_rel = "stages/token_embedding.int8.onnx"
        q_model = quantize_embedding(emb_model)
        save_model(q_model, build / q_rel)
        inits = {t.name: numpy_helper.to_array(t) for t in q_model.graph.initializer}
        cos, snr, err = [], [], []
        for feeds in points:
            ids = feeds[emb_spec.input_names[0]]
            ref = table[ids]
            got = inits["table_int8"][ids].astype(np.float32) * inits["row_scale"][ids]
            cos.append(cosine(ref, got))
            snr.append(snr_db(ref, got))
            err.append(float(np.max(np.abs(ref - got))))
        emb_sb = emb_sb.with_variant(Variant(Role.ORT, q_rel, "int8"))
        from dataclasses import replace

        emb_sb = replace(emb_sb, precision="int8")
        quant_rows.append(
            StageQuantization(
                emb_spec.name,
                "int8",
                "INT8 table, one scale per row",
                (build / emb_rel).stat().st_size,
                (build / q_rel).stat().st_size,
                {"cosine_min": min(cos), "snr_db_min": min(snr), "max_abs_err": max(err)},
                note="measured on seeded token ids",
            )
        )
        del q_model, inits
    reports[-1].seconds = time.perf_counter() - t0
    stages[emb_spec.name] = emb_sb
    del table, emb_model
    phase("token_embedding", t0)

    # -- the canonical FP32 graph, only where the whole model fits ---------------------------------
    contract = llm_inplace_contract(g)
    llm_rel = f"stages/llm.{precision}.ort.onnx" if quantized else "stages/llm.ort.onnx"
    canonical_note = None
    canon_variant = None
    llm_parity: list = []
    if canonical:
        t0 = time.perf_counter()
        canon_variant, llm_parity = _traced_canonical(cfg, llm_spec, build, threads)
        phase("llm canonical (traced, FP32)", t0)
    else:
        canonical_note = (
            f"the FP32 canonical graph (standard ops, {size32 / 2**30:.1f} GiB of weights) was not written: the "
            f"non-streaming export holds ~{NON_STREAMING_FACTOR:g}x that in memory and "
            f"{report['available_memory_bytes'] / 2**30:.1f} GiB was available"
            if not fits_in_memory(cfg.llm)
            else "the FP32 canonical graph was not written: this build was asked not to load the whole model "
            "(the non-streaming export writes it)"
        )
        canonical_note += f"; the stage's canonical variant names the in-place graph {llm_rel}"
        log(f"llm: {canonical_note}")

    # -- the in-place graph, layer by layer -------------------------------------------------------
    t0 = time.perf_counter()
    slots, adapter_files = None, {}
    if cfg.adapters and cfg.merge_adapter is None:  # adapters switched at run time, written beside it
        from omniforge.export.lora import export_adapters

        slots, adapter_files = export_adapters(cfg.adapters, weights, g.num_layers, build, cfg.adapter_auto)
    written = write_llm_graph(
        weights, g.max_context, contract, build / llm_rel, nbits, log=log, lora_slots=slots
    )
    data_rel = f"{llm_rel}.data"
    phase(f"llm in-place graph ({precision}, streamed)", t0)
    report["bytes_read"] = weights.reader.bytes_read
    peak_write = peak_rss_bytes()

    # -- checks against the layer-by-layer reference ----------------------------------------------
    t0 = time.perf_counter()
    conf = weights.hf_config()
    shape = LlamaShape.of(conf, weights)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    tables = rotary_tables(LlamaRotaryEmbedding(config=conf), g.max_context, shape.head_dim)
    tol = llm_spec.tolerance
    graphs = [("served", build / llm_rel, tol.atol, tol.rtol, None)]
    twin = None
    if nbits is not None and nbits.accuracy_level:
        # the served graph computes with INT8 activations (accuracy level 4); its twin at accuracy
        # level 0 (FP32 activations, the same weight file) must match the reference exactly, the
        # served graph closely (its error grows with depth: 1-5% of the output scale measured)
        twin = build / "stages" / f".{Path(llm_rel).name}.level0.onnx"
        _accuracy_level_twin(build / llm_rel, twin)
        graphs = [
            ("accuracy_level 0", twin, tol.atol, tol.rtol, None),
            ("served", build / llm_rel, np.inf, np.inf, SERVED_COSINE),
        ]
    try:
        check = check_streamed(graphs, contract, llm_spec, weights, shape, tables, nbits, threads=threads)
    finally:
        if twin is not None:
            twin.unlink(missing_ok=True)
    llm_parity += check.parity
    phase("llm checks (layer-by-layer reference)", t0)
    report["reference_peak_rss_bytes"] = check.reference_peak_rss
    report["output_cosine_min"] = check.cosine_min

    inplace = Variant(Role.ORT_INPLACE_LLM, llm_rel, precision, (data_rel,), contract)
    if canon_variant is None:
        canon_variant = Variant(Role.CANONICAL, llm_rel, precision, (data_rel,), contract)
    llm_sb = StageBuild((canon_variant, inplace), precision, "omniforge-stream", 17, written.nodes)
    stages[llm_spec.name] = llm_sb
    size_llm = (build / llm_rel).stat().st_size + (build / data_rel).stat().st_size
    reports.append(
        StageReport(llm_spec.name, time.perf_counter() - t_start, written.nodes, size_llm, llm_parity)
    )
    if quantized:
        sym = "symmetric" if nbits.symmetric else "asymmetric"
        quant_rows.append(
            StageQuantization(
                llm_spec.name,
                precision,
                f"weight-only MatMulNBits (RTN), {nbits.bits}-bit {sym}, block {nbits.block_size}, streamed",
                size32,
                size_llm,
                check.metrics,
                note="accuracy vs the FP32 layer-by-layer reference; the embedding table is INT8 in token_embedding",
            )
        )

    # -- reports and manifest ---------------------------------------------------------------------
    failed = [r for r in reports if not r.passed]
    if failed:
        detail = "; ".join(f"{r.stage} max rel {max(p.max_rel for p in r.parity):.2e}" for r in failed)
        raise ExportError(f"the streamed build missed its parity tolerance: {detail}")
    files = {**copy_runtime_files(cfg, spec, build), **adapter_files}
    write_report(build, reports)
    paths = (
        [p for sb in stages.values() for p in sb.files()]
        + list(files.values())
        + ["parity.json", "parity.md"]
    )
    files["parity_report"] = "parity.json"
    if quantized:
        data = [r.__dict__ for r in quant_rows]
        atomic_write_text(build / "quantize.json", json.dumps(data, indent=2) + "\n")
        atomic_write_text(build / "quantize.md", quantize_table(quant_rows) + "\n")
        paths += ["quantize.json", "quantize.md"]
        files["quantize_report"] = "quantize.json"
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    report["peak_rss_write_bytes"] = peak_write
    report["peak_rss_total_bytes"] = peak_rss_bytes()
    report["graph_bytes"] = size_llm
    report["canonical"] = canonical_note or "traced FP32 graph written (stages/llm.onnx)"
    atomic_write_text(build / "stream.json", json.dumps(report, indent=2) + "\n")
    paths.append("stream.json")
    files["stream_report"] = "stream.json"
    plan = {s.name: stages[s.name].precision for s in spec.stages}
    source = {
        "model": str(cfg.root),
        "adapter": cfg.merge_adapter,
        "kind": "llm",
        "precision": precision,
        "precision_plan": plan,
        "llm_stream": {
            "canonical": report["canonical"],
            "peak_rss_bytes": report["peak_rss_total_bytes"],
            "peak_rss_write_bytes": peak_write,
        },
    }
    manifest = Manifest(spec, stages, collect_artifacts(build, paths), files, source, tool_versions())
    write_manifest(build, manifest)
    log(
        f"streamed LLM build: {report['seconds']['total']:.1f}s, peak RSS {report['peak_rss_total_bytes'] / 2**30:.2f} GiB "
        f"(writing {peak_write / 2**30:.2f} GiB), llm {size_llm / 2**30:.2f} GiB"
    )
    return manifest, report


# the served quantized graph (INT8 activations inside MatMulNBits, accuracy level 4) against the
# reference with its weights: every output at a cosine of at least this
SERVED_COSINE = 0.99


def _accuracy_level_twin(path: Path, twin: Path) -> None:
    """A copy of the graph proto at ``path`` with every ``MatMulNBits`` at accuracy level 0,
    reading the same external-data file (written beside it)."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    twin.write_bytes(model.SerializeToString())


def _embedding_parity(path: Path, spec, point: dict[str, int], feeds: dict, ref: np.ndarray, result_cls):
    """The FP32 embedding graph in ONNX Runtime against the table's rows."""
    from omniforge.export.parity import compare
    from omniforge.runtime.engine import open_session

    (got,) = open_session(path, "measurement").run(spec.output_names, feeds)
    diff, rel, scale, ok = compare(ref, got, spec.tolerance.atol, spec.tolerance.rtol)
    return result_cls(spec.name, spec.resolve(point), spec.output_names[0], diff, rel, scale, ok)


def _traced_canonical(cfg, stage, build: Path, threads: int):
    """The canonical FP32 graph traced from the whole model in PyTorch (the non-streaming export's
    path, for a model that fits), with its parity against transformers."""
    from omniforge.export.exporter import export_stage
    from omniforge.export.parity import check_stage
    from omniforge.export.stages import export_module, reference_module
    from omniforge.model.loader import load_llm
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import Variant

    module = load_llm(cfg, cfg.merge_adapter)
    rel = f"stages/{stage.name}.onnx"
    export_stage(export_module(stage, module), stage, build / rel, 17)
    data = (f"{rel}.data",) if (build / f"{rel}.data").exists() else ()
    parity = check_stage(stage, str(build / rel), reference_module(stage, module), threads)
    del module
    return Variant(Role.CANONICAL, rel, "fp32", data), parity
