"""Compare an exported ONNX stage with PyTorch on seeded inputs at several dynamic shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omniforge.pipeline.contracts import Contract, Slot
from omniforge.pipeline.spec import StageSpec


@dataclass(frozen=True)
class ParityResult:
    """Worst output of one stage at one shape."""

    stage: str
    point: dict[str, int]
    output: str
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    ref_scale: float
    passed: bool


def compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[float, float, float, bool]:
    if ref.shape != got.shape:
        return float("inf"), float("inf"), 0.0, False
    diff = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    ok = bool(np.isfinite(got).all()) and diff <= atol + rtol * scale
    return diff, rel, scale, ok


def check_stage(
    stage: StageSpec,
    onnx_path: str,
    reference: nn.Module,
    threads: int = 2,
    points: int | None = None,
    seed: int = 0,
) -> list[ParityResult]:
    """Run ``stage`` in ONNX Runtime (CPU) and in PyTorch at each of its check points (the first
    ``points`` of them when given)."""
    from omniforge.runtime.engine import SessionConfig, open_session

    sess = open_session(onnx_path, "measurement", SessionConfig(threads=threads))
    results = []
    for i, point in enumerate(stage.parity_points()[:points]):
        feeds = stage.sample_inputs(point, seed=seed + i)
        with torch.no_grad():
            ref = reference(*[torch.from_numpy(feeds[n]) for n in stage.input_names])
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(stage.output_names, feeds)
        sizes = stage.resolve(point)
        worst = None
        for name, r, g in zip(stage.output_names, ref, got, strict=True):
            diff, rel, scale, ok = compare(r.numpy(), g, stage.tolerance.atol, stage.tolerance.rtol)
            res = ParityResult(stage.name, sizes, name, diff, rel, scale, ok)
            if worst is None or (not ok and worst.passed) or (ok == worst.passed and rel > worst.max_rel):
                worst = res
        assert worst is not None
        results.append(worst)
    return results


def check_llm_inplace(
    path: str, contract: Contract, hf_model: nn.Module, stage: StageSpec, threads: int = 2, seed: int = 0
) -> list[ParityResult]:
    """The in-place ONNX Runtime LLM graph against HF's full-sequence forward.

    Three sequences of different lengths (the longest fills the context) are prefilled one at a
    time into pool slots, then decoded together for three steps (different cache lengths per
    sequence); at every step the last-position logits and the new hidden states must match HF on
    the whole sequence so far.
    """
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmEngine, probe

    g = stage.llm
    assert g is not None
    engine = LlmEngine(Path(path), g, SessionConfig(threads=threads), contract, preset="measurement")
    rng = np.random.default_rng(seed)
    steps = 3
    lengths = (7, 11, g.max_context - steps)  # the last one fills the context
    ids = [rng.integers(0, g.vocab_size, size=n + steps) for n in lengths]
    with torch.no_grad():
        emb = [hf_model.get_input_embeddings()(torch.from_numpy(i)[None])[0].numpy() for i in ids]
        full = [hf_model(inputs_embeds=torch.from_numpy(e)[None], output_hidden_states=True) for e in emb]
    ref_logits = [f.logits[0].numpy() for f in full]
    ref_hidden = [f.hidden_states[-1][0].numpy() for f in full]
    got = probe(
        engine,
        [e[:n] for e, n in zip(emb, lengths, strict=True)],
        [e[n:] for e, n in zip(emb, lengths, strict=True)],
    )
    tol = stage.tolerance
    logits_name, hidden_name = contract.slot(Slot.LOGITS), contract.slot(Slot.HIDDEN)
    results: list[ParityResult] = []

    def record(point: dict[str, int], name: str, ref: np.ndarray, out: np.ndarray) -> None:
        diff, rel, scale, ok = compare(ref, out, tol.atol, tol.rtol)
        results.append(ParityResult(f"{stage.name}[onnxruntime]", point, name, diff, rel, scale, ok))

    for k, n in enumerate(lengths):
        record({"batch": 1, "seq": n, "past": 0}, logits_name, ref_logits[k][n - 1], got.logits[k][0])
        record({"batch": 1, "seq": n, "past": 0}, hidden_name, ref_hidden[k][:n], got.hidden[k][:n])
        for t in range(steps):
            point = {"batch": len(lengths), "seq": 1, "past": n + t}
            record(point, logits_name, ref_logits[k][n + t], got.logits[k][t + 1])
            record(point, hidden_name, ref_hidden[k][n + t], got.hidden[k][n + t])
    # keep the worst result per shape, like check_stage
    worst: dict[str, ParityResult] = {}
    for r in results:
        key = str(sorted(r.point.items()))
        w = worst.get(key)
        if w is None or (not r.passed and w.passed) or (r.passed == w.passed and r.max_rel > w.max_rel):
            worst[key] = r
    return list(worst.values())
