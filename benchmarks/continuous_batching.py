"""Continuous batching: aggregate decode throughput of N concurrent streams vs one, in one run.

usage: python benchmarks/continuous_batching.py [--work /tmp/omniforge-bench] [--precision int4]
       [--streams 8] [--new 64] [--runs 3]

Uses the 150M LLaMA-shaped model of ``llm_decode.py`` (built once with ``omniforge build``), then
measures with ``omniforge.runtime.batching.ContinuousBatcher``: one stream alone, then ``--streams``
streams submitted together (prompt 32, ``--new`` tokens each, EOS ignored), median of ``--runs``.
Reported: aggregate tokens/s and each stream's per-token latency, and their ratios to the single
stream (the targets: aggregate >= 3x, per-token latency <= 2x). Beside them, the engine's own
ceiling measured in the same run: one bare decode step (the in-place graph through its I/O binding,
no scheduler, no sampling) at batch 1 and at batch N; ``N * step(1) / step(N)`` is the most any
scheduler can reach on this machine, and the batcher's ratio is reported against it. Results go to
benchmarks/results/continuous_batching-<precision>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_results  # noqa: E402
from llm_decode import PROMPT, make_model  # noqa: E402


def build(work: Path, precision: str) -> Path:
    out = work / f"batching-{precision}"
    if not (out / "manifest.json").is_file():
        model = make_model(work / "llama-150m")
        cmd = [
            sys.executable,
            "-m",
            "omniforge",
            "build",
            str(model),
            "--out",
            str(out),
            "--precision",
            precision,
        ]
        subprocess.run(cmd, check=True)
    return out


def measure(build_dir: Path, streams: int, new: int) -> dict:
    from omniforge.runtime.batching import ContinuousBatcher
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    rt = LlmRuntime(build_dir, num_slots=streams, prefix_cache_entries=0)
    cfg = GenerationConfig(max_new_tokens=new, stop_token_ids=())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, rt.geometry.vocab_size, PROMPT).tolist() for _ in range(streams)]
    with ContinuousBatcher(rt) as batcher:
        batcher.generate(prompts[0], GenerationConfig(max_new_tokens=4, stop_token_ids=()))  # warm-up
        t0 = time.perf_counter()
        handles = [batcher.submit(p, cfg) for p in prompts]
        results = [h.result() for h in handles]
        wall = time.perf_counter() - t0
    per_token = [r.decode_s / max(1, r.new_tokens - 1) for r in results]
    return {
        "streams": streams,
        "tokens": sum(r.new_tokens for r in results),
        "wall_s": wall,
        "aggregate_tok_s": sum(r.new_tokens for r in results) / wall,
        "per_token_ms": 1000 * float(np.median(per_token)),
    }


def engine_steps(build_dir: Path, streams: int, context: int = PROMPT + 32, steps: int = 40) -> dict:
    """Seconds per bare decode step at batch 1 and at batch ``streams`` (median of 3 rounds)."""
    from omniforge.runtime.kv_cache import SlotRange
    from omniforge.runtime.llm import LlmRuntime

    rt = LlmRuntime(build_dir, num_slots=streams, prefix_cache_entries=0)
    h = rt.geometry.hidden_size
    rng = np.random.default_rng(0)
    out = {}
    for b in (1, streams):
        rt.pool.lengths[:] = 0
        binding = rt.engine.bind(rt.pool, SlotRange(0, b))
        binding.step((0.1 * rng.standard_normal((b, context, h))).astype(np.float32))
        row = (0.1 * rng.standard_normal((b, 1, h))).astype(np.float32)
        rounds = []
        for _ in range(3):
            rt.pool.lengths[:b] = context
            t0 = time.perf_counter()
            for _ in range(steps):
                binding.step(row, copy=False, trusted=True)
            rounds.append((time.perf_counter() - t0) / steps)
        out[b] = median(rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams, >= 2 (default 8)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per stream, >= 2 (default 64)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; the median is reported (default 3)")
    args = ap.parse_args()
    if args.streams < 2 or args.new < 2 or args.runs < 1:  # N streams are compared with one
        ap.error("--streams and --new must be >= 2, --runs >= 1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    b = build(work, args.precision)
    rows = {1: [], args.streams: []}
    for _ in range(args.runs):  # interleaved rounds: drift hits both alike
        for n in rows:
            rows[n].append(measure(b, n, args.new))
    steps = engine_steps(b, args.streams)
    ceiling = args.streams * steps[1] / steps[args.streams]
    one, many = (
        {k: median([r[k] for r in rows[n]]) for k in ("aggregate_tok_s", "per_token_ms")} for n in rows
    )
    data = {
        "machine": machine(),
        "precision": args.precision,
        "new_tokens": args.new,
        "single": one,
        "concurrent": {**many, "streams": args.streams},
        "aggregate_ratio": many["aggregate_tok_s"] / one["aggregate_tok_s"],
        "per_token_ratio": many["per_token_ms"] / one["per_token_ms"],
        "engine_step_ms": {str(k): 1000 * v for k, v in steps.items()},
        "engine_aggregate_ceiling": ceiling,
        "runs": rows,
    }
    md = "\n".join(
        [
            f"# Continuous batching, 150M LLaMA-shaped model, {args.precision} (prompt {PROMPT}, {args.new} new tokens)",
            "",
            "| streams | aggregate tokens/s | per-token latency (ms) |",
            "|---:|---:|---:|",
            f"| 1 | {one['aggregate_tok_s']:.1f} | {one['per_token_ms']:.2f} |",
            f"| {args.streams} | {many['aggregate_tok_s']:.1f} | {many['per_token_ms']:.2f} |",
            "",
            f"Aggregate ratio {data['aggregate_ratio']:.2f}x (target >= 3x); per-token latency ratio "
            f"{data['per_token_ratio']:.2f}x (target <= 2x). Machine: {data['machine'].get('cpu', '')}, "
            f"{data['machine'].get('cpus')} CPUs.",
            "",
            f"The engine alone (a bare decode step, no scheduler): {1000 * steps[1]:.2f} ms at batch 1, "
            f"{1000 * steps[args.streams]:.2f} ms at batch {args.streams}: at most "
            f"{ceiling:.2f}x aggregate on this machine; the batcher reaches "
            f"{data['aggregate_ratio'] / ceiling:.0%} of it.",
        ]
    )
    paths = write_results(f"continuous_batching-{args.precision}", data, md)
    print(md)
    print(f"written: {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
