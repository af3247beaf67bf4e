"""Checks of a streamed LLM graph against a layer-by-layer numpy reference (no PyTorch model).

``LayerwiseReference`` runs LLaMA's forward (RMSNorm, rotary, grouped-query causal attention,
SwiGLU; the linear layers' biases and Qwen3's per-head q/k norms where the weights have them)
over whole sequences, one weight at a time read from the shards, so it needs no more memory than
the writer. Two weight sets can go through in the same sweep: the FP32 weights, and
the weights the graph holds (the same ``MatMulNBits`` codes, dequantized) — the first gives the
quantized graph's accuracy, the second its parity (same function, same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omniforge.export.llm_stream import LlamaFolder, NBits, nbits_codes, nbits_dequantize, peak_rss_bytes


def _rms(h: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(h * h, axis=-1, keepdims=True)
    return g * (h / np.sqrt(var + eps))


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """LLaMA's rotate-half rotary embedding of (T, heads, hd) rows at positions 0..T-1."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


@dataclass
class _Group:
    """Sequences pushed through one weight set: their rows stacked (R, H), and where each starts."""

    h: np.ndarray
    bounds: list[tuple[int, int]]
    graph_weights: bool  # the graph's (dequantized) weights, else FP32


class LayerwiseReference:
    """LLaMA's forward in numpy over full sequences (positions from 0), weights read as needed."""

    def __init__(
        self, weights: LlamaFolder, shape, rotary: tuple[np.ndarray, np.ndarray], nbits: NBits | None
    ) -> None:
        self.w, self.shape, self.nbits = weights, shape, nbits
        self.cos, self.sin = rotary  # (ctx, hd / 2)
        self.peak_rss = 0

    def _weight(self, name: str, graph: bool) -> np.ndarray:
        w = self.w.tensor(name)
        if graph and self.nbits is not None:
            packed, scales, zero = nbits_codes(w, self.nbits)
            w = nbits_dequantize(packed, scales, zero, self.nbits, w.shape[1])
        return w

    def _linear(self, groups: list[_Group], xs: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
        """x @ W.T per group, W the concatenation of ``names``; each weight read once per weight set."""
        out: list[list[np.ndarray]] = [[] for _ in groups]
        for name in names:
            cache: dict[bool, np.ndarray] = {}
            for j, g in enumerate(groups):
                key = g.graph_weights and self.nbits is not None
                if key not in cache:
                    cache[key] = self._weight(name, key)
                out[j].append(xs[j] @ cache[key].T)
            del cache
        self.peak_rss = max(self.peak_rss, peak_rss_bytes())
        return [np.concatenate(o, axis=-1) if len(o) > 1 else o[0] for o in out]

    def _proj(self, groups: list[_Group], xs: list[np.ndarray], name: str, bias: bool) -> list[np.ndarray]:
        """``_linear`` of the one weight ``name``, plus its HF bias where ``bias`` (FP32 in both
        weight sets: the graph keeps biases float)."""
        ys = self._linear(groups, xs, [name])
        if not bias:
            return ys
        b = self.w.tensor(name.removesuffix("weight") + "bias")
        return [y + b for y in ys]

    def _attention(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, bounds, qk_norm: tuple | None
    ) -> np.ndarray:
        """Causal attention of each sequence in ``bounds``; ``qk_norm``: Qwen3's (q, k) head-norm gammas."""
        s = self.shape
        nh, kvh, hd = s.num_heads, s.num_kv_heads, s.head_dim
        out = np.empty((len(q), nh * hd), np.float32)
        for a, b in bounds:
            t = b - a
            cos = np.concatenate([self.cos[:t], self.cos[:t]], axis=-1)[:, None]  # (T, 1, hd)
            sin = np.concatenate([self.sin[:t], self.sin[:t]], axis=-1)[:, None]
            qs, ks = q[a:b].reshape(t, nh, hd), k[a:b].reshape(t, kvh, hd)
            if qk_norm is not None:  # Qwen3: RMSNorm of each head before rotary
                qs, ks = _rms(qs, qk_norm[0], s.eps), _rms(ks, qk_norm[1], s.eps)
            qs, ks = _rope(qs, cos, sin), _rope(ks, cos, sin)
            vs = v[a:b].reshape(t, kvh, hd)
            rep = nh // kvh
            ks, vs = np.repeat(ks, rep, axis=1), np.repeat(vs, rep, axis=1)  # head j reads kv head j // rep
            scores = np.einsum("shd,thd->hst", qs, ks) * np.float32(hd**-0.5)
            scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            out[a:b] = np.einsum("hst,thd->shd", probs, vs).reshape(t, nh * hd)
        return out

    def run(self, fp32: list[np.ndarray], graph: list[np.ndarray]) -> tuple[list, list]:
        """(logits (T, V), final hidden (T, H)) of every row of each (T, H) sequence, through the
        FP32 weights (``fp32``) and the graph's weights (``graph``), in one sweep over the layers."""
        groups = []
        for seqs, is_graph in ((fp32, False), (graph, True)):
            if seqs:
                lengths = np.cumsum([0] + [len(x) for x in seqs])
                bounds = list(zip(lengths[:-1].tolist(), lengths[1:].tolist(), strict=True))
                groups.append(_Group(np.concatenate(seqs).astype(np.float32), bounds, is_graph))
        s, eps = self.shape, self.shape.eps
        for i in range(s.num_layers):
            hf = f"model.layers.{i}."
            g_in = self.w.tensor(hf + "input_layernorm.weight")
            xs = [_rms(g.h, g_in, eps) for g in groups]
            q, k, v = (self._proj(groups, xs, f"{hf}self_attn.{n}_proj.weight", s.qkv_bias) for n in "qkv")
            norms = (
                tuple(self.w.tensor(f"{hf}self_attn.{n}_norm.weight") for n in "qk") if s.qk_norm else None
            )
            att = [self._attention(q[j], k[j], v[j], g.bounds, norms) for j, g in enumerate(groups)]
            o = self._proj(groups, att, hf + "self_attn.o_proj.weight", s.o_bias)
            for g, oj in zip(groups, o, strict=True):
                g.h = g.h + oj
            g_post = self.w.tensor(hf + "post_attention_layernorm.weight")
            xs = [_rms(g.h, g_post, eps) for g in groups]
            gate = self._proj(groups, xs, hf + "mlp.gate_proj.weight", s.mlp_bias)
            up = self._proj(groups, xs, hf + "mlp.up_proj.weight", s.mlp_bias)
            act = [gt / (1 + np.exp(-gt)) * u for gt, u in zip(gate, up, strict=True)]
            down = self._proj(groups, act, hf + "mlp.down_proj.weight", s.mlp_bias)
            for g, dj in zip(groups, down, strict=True):
                g.h = g.h + dj
        g_f = self.w.tensor("model.norm.weight")
        hidden = [_rms(g.h, g_f, eps) for g in groups]
        logits = self._linear(groups, hidden, ["lm_head.weight"])
        out = []
        for j, g in enumerate(groups):
            out.append([(logits[j][a:b], hidden[j][a:b]) for a, b in g.bounds])
        fp32_out = out[0] if fp32 else []
        graph_out = out[-1] if graph else []
        return fp32_out, graph_out


@dataclass
class StreamCheck:
    parity: list  # ParityResult per shape (the graph vs the reference with the graph's weights)
    metrics: dict[str, float]  # quantized graphs: accuracy vs the FP32 reference (LLM_METRICS)
    seconds: float
    reference_peak_rss: int
    cosine_min: dict[str, float]  # per graph label: the lowest output cosine against the reference


def check_streamed(
    graphs: list[tuple[str, Path, float, float, float | None]],
    contract,
    stage,
    weights: LlamaFolder,
    shape,
    rotary: tuple[np.ndarray, np.ndarray],
    nbits: NBits | None,
    threads: int = 2,
    seed: int = 0,
    steps: int = 3,
    longest: int = 64,
) -> StreamCheck:
    """Streamed in-place graphs ``graphs`` ((label, path, atol, rtol, min_cosine) each, the
    served graph last) against ``LayerwiseReference``.

    Parity: as ``parity.check_llm_inplace``, three sequences (7 and 11 rows, and one filling the
    context, or ``longest`` rows when the context is longer than 512) prefilled one at a time into
    pool slots and decoded together for ``steps`` steps; last-row logits and new hidden states
    against the reference computed with the weights the graph holds, within each graph's ``atol +
    rtol * max|ref|`` and, where ``min_cosine`` is given, at a cosine of at least that. Quantized graphs also get ``metrics`` (of the served graph): next-token agreement, KL and logits cosine
    against the FP32 reference after a seeded 12-row prompt and each of 24 seeded decode rows
    (the rows ``quantize._llm_metrics`` feeds)."""
    import time

    from omniforge.calibration.metrics import cosine, kl_divergence, top1_agreement
    from omniforge.export.parity import ParityResult, compare
    from omniforge.pipeline.contracts import Slot
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmEngine, probe

    t0 = time.perf_counter()
    g = stage.llm
    rng = np.random.default_rng(seed)
    fill = g.max_context - steps if g.max_context <= 512 else longest
    lengths = (7, 11, fill)
    ids = [rng.integers(0, g.vocab_size, size=n + steps) for n in lengths]
    emb = [weights.embedding_rows(i) for i in ids]
    metric_rows: list[np.ndarray] = []
    if nbits is not None:  # the rows quantize._llm_metrics feeds
        r = np.random.default_rng(0)
        prompt = (r.standard_normal((12, g.hidden_size)) * 0.05).astype(np.float32)
        follow = (r.standard_normal((24, g.hidden_size)) * 0.05).astype(np.float32)
        metric_rows = [np.concatenate([prompt, follow])]
    ref = LayerwiseReference(weights, shape, rotary, nbits)
    fp32_seqs = emb if nbits is None else metric_rows
    ref_fp32, ref_graph = ref.run(fp32_seqs, emb if nbits is not None else [])
    if nbits is None:
        ref_graph = ref_fp32
    logits_name, hidden_name = contract.slot(Slot.LOGITS), contract.slot(Slot.HIDDEN)
    worst: dict[str, ParityResult] = {}
    metrics: dict[str, float] = {}
    cosines: dict[str, float] = {}
    for label, path, atol, rtol, min_cosine in graphs:
        engine = LlmEngine(Path(path), g, SessionConfig(threads=threads), contract, preset="measurement")
        got = probe(
            engine,
            [e[:n] for e, n in zip(emb, lengths, strict=True)],
            [e[n:] for e, n in zip(emb, lengths, strict=True)],
        )
        pairs = []  # (point, output, reference, got)
        for k, n in enumerate(lengths):
            logits, hidden = ref_graph[k]
            prefill = {"batch": 1, "seq": n, "past": 0}
            pairs += [(prefill, logits_name, logits[n - 1], got.logits[k][0])]
            pairs += [(prefill, hidden_name, hidden[:n], got.hidden[k][:n])]
            for t in range(steps):
                point = {"batch": len(lengths), "seq": 1, "past": n + t}
                pairs += [(point, logits_name, logits[n + t], got.logits[k][t + 1])]
                pairs += [(point, hidden_name, hidden[n + t], got.hidden[k][n + t])]
        results = []
        for point, name, r, o in pairs:
            diff, rel, scale, ok = compare(r, o, atol, rtol)
            cos = cosine(r, o)
            cosines[label] = min(cosines.get(label, 1.0), cos)
            if min_cosine is not None:
                ok = ok and cos >= min_cosine
            results.append(
                ParityResult(f"{stage.name}[streamed, {label}]", point, name, diff, rel, scale, ok)
            )
        for r in results:  # the worst result per graph and shape, like check_stage
            key = f"{label} {sorted(r.point.items())}"
            w = worst.get(key)
            if w is None or (not r.passed and w.passed) or (r.passed == w.passed and r.max_rel > w.max_rel):
                worst[key] = r
        if nbits is not None and label == graphs[-1][0]:
            rows = metric_rows[0]
            q = probe(engine, [rows[:12]], [rows[12:]]).logits[0]  # (25, V)
            fp = ref_fp32[0][0][11:]
            metrics = {
                "top1_agreement": top1_agreement(fp, q),
                "kl_divergence": kl_divergence(fp, q),
                "logits_cosine": cosine(fp, q),
            }
        del engine
    return StreamCheck(list(worst.values()), metrics, time.perf_counter() - t0, ref.peak_rss, cosines)
