"""LoRA adapters switched at run time vs merged into the weights, side by side in one run.

usage: python benchmarks/lora.py [--work /tmp/omniforge-bench] [--precision fp32] [--rounds 5]
       [--threads 2] [--skip-equality]

The 150M LLaMA-shaped model of ``llm_decode.py`` gets four seeded PEFT adapters (image, video,
audio, text; rank 16 on q/k/v/o, ``lora_alpha`` 32) in a NExT-GPT-style folder (``nextgpt.json``
naming the LLM and the adapters, no other stage). Built with ``omniforge build``: the base with
the four adapters switchable, and one build per adapter with it merged (``merge_adapter``).
Measured:
- equality (FP32): each switched adapter against its merged build: max |logits| difference after
  a 32-token prompt and the first 64 greedy tokens;
- switching cost: binding another adapter's inputs between two requests (median of 1000);
- per-token decode at batch 1 (prompt 32, 64 new tokens, median of ``--rounds`` interleaved
  rounds): merged, switched (unmerged) and the base with no adapter; and the one-token graph step
  alone, in blocks of 30 steps per case (less sensitive to a busy machine);
- a batch of 4 whose sequences use 4 different adapters vs 4 sequences with one adapter.
Results go to benchmarks/results/lora.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, spread, write_results  # noqa: E402
from llm_decode import NEW, PROMPT, make_model, prompt_ids  # noqa: E402

ADAPTERS = ("image", "video", "audio", "text")
RANK = 16


def make_adapters(llm: Path, root: Path) -> dict[str, str]:
    """Four seeded rank-16 PEFT adapters of ``llm``, large enough to change greedy output."""
    from omniforge.model.tiny import seeded_lora

    out = {}
    for i, name in enumerate(ADAPTERS):
        folder = root / "lora" / name
        out[name] = str(folder)
        if not (folder / "adapter_config.json").is_file():
            seeded_lora(llm, folder, RANK, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.2, 100 + i)
    return out


def model_folder(root: Path, llm: Path, adapters: dict[str, str], merge: str | None) -> Path:
    from omniforge.pipeline.model_config import FORMAT, FORMAT_VERSION

    folder = root / (f"nextgpt-merged-{merge}" if merge else "nextgpt-switched")
    folder.mkdir(parents=True, exist_ok=True)
    desc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llm": str(llm),
        "max_context": PROMPT + NEW + 32,
        "adapters": adapters,
        "adapter_auto": {m: m for m in ADAPTERS},
    }
    if merge:
        desc["merge_adapter"] = merge
    (folder / "nextgpt.json").write_text(json.dumps(desc, indent=2))
    return folder


def build(model: Path, out: Path, precision: str) -> Path:
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "omniforge", "build", str(model), "--out", str(out)]
        subprocess.run([*cmd, "--precision", precision], check=True)
    return out


def runtime(path: Path, threads: int, slots: int = 1):
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmRuntime

    return LlmRuntime(
        path,
        num_slots=slots,
        prefix_cache_entries=0,
        max_context=PROMPT + NEW + 8,
        session=SessionConfig(threads=threads),
    )


def prefill_logits(rt, ids: list[int], adapter: str | None) -> np.ndarray:
    from omniforge.runtime.kv_cache import SlotRange

    rows = rt.embed_ids(ids)
    slot = rt.allocate_slots(1)
    try:
        binding = rt.engine.bind(rt.pool, SlotRange(slot.start, 1))
        binding.use_adapters(rt.adapter_arrays([adapter]))
        return binding.step(rows[None])[0][0]
    finally:
        rt.pool.release(slot)


def equality(switched: Path, merged: dict[str, Path], threads: int) -> dict:
    from omniforge.runtime.sampling import GenerationConfig

    rt = runtime(switched, threads)
    ids = prompt_ids(PROMPT)
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=())
    out = {}
    for name, path in merged.items():
        m = runtime(path, threads)
        diff = float(np.abs(prefill_logits(rt, ids, name) - prefill_logits(m, ids, None)).max())
        a = rt.generate(ids, cfg, adapter=name).token_ids
        b = m.generate(ids, cfg, adapter="none").token_ids
        out[name] = {"max_abs_logits": diff, "tokens_equal": a == b, "tokens": len(a)}
    base = rt.generate(ids, cfg, adapter="none").token_ids
    out["differs_from_base"] = {n: rt.generate(ids, cfg, adapter=n).token_ids != base for n in ADAPTERS}
    return out


def switching(switched: Path, threads: int, n: int = 1000) -> dict:
    from omniforge.runtime.kv_cache import SlotRange

    rt = runtime(switched, threads)
    t0 = time.perf_counter()
    for name in ADAPTERS:
        rt.adapters.get(name)
    load_s = (time.perf_counter() - t0) / len(ADAPTERS)
    binding = rt.engine.bind(rt.pool, SlotRange(0, 1))
    times = []
    for i in range(n):
        name = ADAPTERS[i % len(ADAPTERS)]
        t = time.perf_counter()
        binding.use_adapters(rt.adapter_arrays([rt.resolve_adapter(name)]))
        times.append(time.perf_counter() - t)
    return {
        "switch_ms_median": 1000 * median(times),
        "switch_ms_p99": 1000 * float(np.percentile(times, 99)),
        "first_load_ms": 1000 * load_s,
    }


def decode(switched: Path, merged_text: Path, threads: int, rounds: int) -> dict:
    from omniforge.runtime.sampling import GenerationConfig

    ids = prompt_ids(PROMPT)
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=())
    rt, m = runtime(switched, threads), runtime(merged_text, threads)
    cases = {
        "merged": lambda: m.generate(ids, cfg, adapter="none"),
        "switched": lambda: rt.generate(ids, cfg, adapter="text"),
        "base, no adapter": lambda: rt.generate(ids, cfg, adapter="none"),
    }
    for f in cases.values():
        f()  # warm-up
    per_token: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            r = f()
            per_token[k].append(r.decode_s / (r.new_tokens - 1))
    out = {k: {"ms": 1000 * median(v), "spread": spread(v)} for k, v in per_token.items()}
    out["switched_over_merged"] = out["switched"]["ms"] / out["merged"]["ms"]
    return out


def steps(switched: Path, merged_text: Path, threads: int, rounds: int, block: int = 30) -> dict:
    """The graph's one-token step alone (no sampling or Python loop), in blocks of ``block`` steps
    per case, the cases rotated ``rounds`` times: median and 10th percentile per step."""
    from omniforge.runtime.kv_cache import SlotRange

    rt, m = runtime(switched, threads, slots=2), runtime(merged_text, threads)
    rows = rt.embed_ids(prompt_ids(PROMPT))
    one = rt.embed_ids([5])[None]
    cases = {
        "merged": (m, m.bind_for([None], SlotRange(0, 1))),
        "switched": (rt, rt.bind_for(["text"], SlotRange(0, 1))),
        "base, no adapter": (rt, rt.bind_for([None], SlotRange(1, 1))),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, (r, binding) in cases.items():
            r.pool.lengths[binding.slots.start] = 0
            binding.step(rows[None])
            for _ in range(5):  # the session's threads awake
                binding.step(one, copy=False, trusted=True)
            for _ in range(block):
                t0 = time.perf_counter()
                binding.step(one, copy=False, trusted=True)
                times[k].append(time.perf_counter() - t0)
    out = {
        k: {"ms": 1000 * median(v), "p10_ms": 1000 * float(np.percentile(v, 10))} for k, v in times.items()
    }
    out["switched_over_merged"] = out["switched"]["ms"] / out["merged"]["ms"]
    return out


def mixed_batch(switched: Path, threads: int, rounds: int) -> dict:
    from omniforge.runtime.sampling import GenerationConfig

    rt = runtime(switched, threads, slots=4)
    prompts = [prompt_ids(PROMPT, seed=s) for s in range(4)]
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=())
    cases = {"same adapter x4": ["text"] * 4, "4 different adapters": list(ADAPTERS)}
    for names in cases.values():
        rt.generate_batch(prompts, cfg, adapters=names)  # warm-up
    walls: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, names in cases.items():
            t0 = time.perf_counter()
            rt.generate_batch(prompts, cfg, adapters=names)
            walls[k].append(time.perf_counter() - t0)
    out = {k: {"s": median(v), "spread": spread(v)} for k, v in walls.items()}
    out["mixed_over_same"] = out["4 different adapters"]["s"] / out["same adapter x4"]["s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4", "int8"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-equality", action="store_true", help="skip the four merged FP32 builds")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    work = Path(args.work)
    llm = make_model(work / "llama-150m")
    adapters = make_adapters(llm, work / "lora-150m")
    p = args.precision
    switched = build(model_folder(work / "lora-150m", llm, adapters, None), work / f"lora-switched-{p}", p)
    merged_text = build(
        model_folder(work / "lora-150m", llm, adapters, "text"), work / f"lora-merged-text-{p}", p
    )
    data: dict = {"machine": machine(), "precision": p, "rank": RANK, "threads": args.threads}
    if not args.skip_equality:
        fp32 = build(
            model_folder(work / "lora-150m", llm, adapters, None), work / "lora-switched-fp32", "fp32"
        )
        merged = {
            n: build(
                model_folder(work / "lora-150m", llm, adapters, n), work / f"lora-merged-{n}-fp32", "fp32"
            )
            for n in ADAPTERS
        }
        data["equality_fp32"] = equality(fp32, merged, args.threads)
    data["switching"] = switching(switched, args.threads)
    data["decode_batch1"] = decode(switched, merged_text, args.threads, args.rounds)
    data["step_batch1"] = steps(switched, merged_text, args.threads, args.rounds)
    data["batch4"] = mixed_batch(switched, args.threads, args.rounds)
    md = [
        f"# LoRA at run time, 150M LLaMA-shaped model, {p}, rank {RANK}, {args.threads} threads",
        "",
        f"Machine: {data['machine'].get('cpu', data['machine']['processor'])}, {data['machine']['cpus']} CPUs, "
        f"onnxruntime {data['machine']['onnxruntime']}. Ratios are measured side by side in one run.",
        "",
    ]
    if "equality_fp32" in data:
        md += ["| adapter | max abs logits diff vs merged (FP32) | 64 greedy tokens equal |", "|---|---|---|"]
        for n in ADAPTERS:
            e = data["equality_fp32"][n]
            md.append(f"| {n} | {e['max_abs_logits']:.2e} | {e['tokens_equal']} |")
        md.append("")
    s, d, b, st = data["switching"], data["decode_batch1"], data["batch4"], data["step_batch1"]
    md += [
        "| measure | value | target |",
        "|---|---|---|",
        f"| switching adapters between requests | {s['switch_ms_median']:.3f} ms (p99 {s['switch_ms_p99']:.3f}) | < 1 ms |",
        f"| first load of an adapter file | {s['first_load_ms']:.1f} ms | |",
        f"| per token, merged | {d['merged']['ms']:.2f} ms | |",
        f"| per token, switched (unmerged rank {RANK}) | {d['switched']['ms']:.2f} ms | |",
        f"| per token, base without adapter | {d['base, no adapter']['ms']:.2f} ms | |",
        f"| switched / merged (whole generations) | {d['switched_over_merged']:.3f} | <= 1.10 |",
        f"| one-token graph step: merged / switched / base | {st['merged']['ms']:.2f} / "
        f"{st['switched']['ms']:.2f} / {st['base, no adapter']['ms']:.2f} ms | |",
        f"| switched / merged (graph step) | {st['switched_over_merged']:.3f} | <= 1.10 |",
        f"| batch of 4, one adapter | {b['same adapter x4']['s']:.3f} s | |",
        f"| batch of 4, four adapters | {b['4 different adapters']['s']:.3f} s | |",
        f"| mixed / same | {b['mixed_over_same']:.3f} | <= 1.20 |",
    ]
    j, m = write_results(f"lora-{p}", data, "\n".join(md))
    print("\n".join(md))
    print(f"\nwritten: {j}, {m}")


if __name__ == "__main__":
    main()
