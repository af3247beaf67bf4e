"""Decode speed of a 150M-parameter LLaMA-shaped model, side by side in one run.

usage: python benchmarks/llm_decode.py [--work /tmp/omniforge-bench] [--runs 5] [--threads 2]
       [--native-library build/native/libomniforge.so]

Builds the reference model (hidden 1024, 8 layers, 16 heads, 4 KV heads, ffn 2816, vocab 32000,
seeded) as a local HF folder, exports it with omniforge, builds ONNX Runtime GenAI's fp32 model of
the same folder when onnxruntime-genai is installed, and measures batch-1 decoding (prompt 32,
64 new tokens, median of ``--runs``; each runtime in its own process, run in interleaved rounds)
for: transformers eager, a plain ONNX Runtime loop over the
canonical export (present fed back as past), ONNX Runtime GenAI, and omniforge's runtime with its
Python decode loop and, where libomniforge is built (``--native-library``, or where
``LlmRuntime`` finds it), with the native core's loop (``backend="native"``). Also
measured: the fp32 memory-bandwidth bound, per-token latency at context 2048 vs 64, and the
time to first token of a second conversation turn over a 512-token prefix.
Results go to benchmarks/results/llm_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import genai_greedy, machine, median, read_bandwidth, spread, write_results  # noqa: E402

PROMPT, NEW = 32, 64
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=32000,
)


def make_model(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.model.tokenizer import save_tokenizer, train_tokenizer

    torch.manual_seed(0)
    conf = LlamaConfig(
        **SHAPE, max_position_embeddings=2304, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1
    )
    LlamaForCausalLM(conf).eval().save_pretrained(folder)
    save_tokenizer(train_tokenizer(512), folder)  # GenAI's builder wants a tokenizer beside the weights
    return folder


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(2, SHAPE["vocab_size"], size=n).tolist()


def bench_transformers(folder: Path, threads: int) -> Callable[[], tuple[float, float]]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(PROMPT)])

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == PROMPT + n
        return time.perf_counter() - t0

    gen(4)
    return lambda: (gen(1), gen(NEW))


def summarize(ttft: list[float], total: list[float]) -> dict:
    decode = [(NEW - 1) / max(t - median(ttft), 1e-9) for t in total]
    return {
        "ttft_ms": median(ttft) * 1000,
        "decode_tok_s": median(decode),
        "e2e_tok_s": NEW / median(total),
        "spread": spread(total),
    }


def bench_plain_ort(build: Path, threads: int) -> Callable[[], tuple[float, float]]:
    """The canonical export run naively: the whole cache goes in and comes out every step."""
    from omniforge.runtime.build import Build
    from omniforge.runtime.engine import SessionConfig

    b = Build(build, SessionConfig(threads=threads))
    llm, emb = b.engine("llm"), b.engine("token_embedding")
    g = b.pipeline.stage("llm").llm
    ids = np.asarray([prompt_ids(PROMPT)], np.int64)

    def gen(n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        past = {
            f"past_key_values.{i}.{k}": np.zeros((1, g.num_kv_heads, 0, g.head_dim), np.float32)
            for i in range(g.num_layers)
            for k in ("key", "value")
        }
        x, pos, ttft = ids, 0, 0.0
        for step in range(n):
            e = emb.session.run(None, {"input_ids": x})[0]
            s = x.shape[1]
            feeds = {
                "inputs_embeds": e,
                "attention_mask": np.ones((1, pos + s), np.int64),
                "position_ids": np.arange(pos, pos + s)[None],
                **past,
            }
            out = llm.session.run(None, feeds)
            past = dict(zip(past, out[2:], strict=True))
            pos += s
            x = np.argmax(out[0][:, -1], axis=-1)[:, None].astype(np.int64)
            if step == 0:
                ttft = time.perf_counter() - t0
        return ttft, time.perf_counter() - t0

    gen(4)
    return lambda: gen(NEW)


def single_runtime(build: Path, threads: int, max_context: int, backend: str = "python"):
    """An omniforge LLM runtime with one cache slot and no prefix cache."""
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmRuntime

    return LlmRuntime(
        build,
        num_slots=1,
        prefix_cache_entries=0,
        max_context=max_context,
        session=SessionConfig(threads=threads),
        backend=backend,
    )


def bench_omniforge(build: Path, threads: int, backend: str = "python") -> Callable[[], tuple[float, float]]:
    from omniforge.runtime.sampling import GenerationConfig

    rt = single_runtime(build, threads, PROMPT + NEW + 8, backend)
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=())
    ids = prompt_ids(PROMPT)
    rt.generate(ids, GenerationConfig(max_new_tokens=4, stop_token_ids=()))

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        r = rt.generate(ids, cfg)
        assert r.new_tokens == NEW
        return r.ttft_s, time.perf_counter() - t0

    return once


def build_genai(folder: Path, out: Path, threads: int, precision: str = "fp32") -> Path | None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    if not (out / "genai_config.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(folder),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(out.parent / "genai-cache"),
        ]
        if precision == "int4":
            cmd += ["--extra_options", "int4_accuracy_level=4", "int4_block_size=32"]
        subprocess.run(cmd, check=True, capture_output=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def bench_genai(path: Path) -> Callable[[], tuple[float, float]]:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    ids = prompt_ids(PROMPT)

    return genai_greedy(model, ids, NEW)


def paired_int4(
    build4: Path, genai4: Path, threads: int, rounds: int = 25, with_native: bool = False
) -> dict:
    """omniforge (Python loop, and native loop ``with_native``) vs GenAI INT4 decode in one
    process, alternating generation by generation; the per-round ratios cancel the slow drift of a
    shared machine. Also the bare decode step of the omniforge graph in a loop (the same binding,
    no sampling), which splits graph from loop."""
    from omniforge.runtime.kv_cache import SlotRange
    from omniforge.runtime.sampling import GenerationConfig

    genai = bench_genai(genai4)
    rt = single_runtime(build4, threads, PROMPT + NEW + 8)
    native = single_runtime(build4, threads, PROMPT + NEW + 8, "native") if with_native else None
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=())
    ids = prompt_ids(PROMPT)
    rt.generate(ids, cfg)
    if native is not None:
        assert native.generate(ids, cfg).token_ids == rt.generate(ids, cfg).token_ids

    def bare() -> float:
        slot = rt.pool.allocate(1)
        binding = rt.engine.bind(rt.pool, SlotRange(slot.start, 1))
        binding.step(rt.embed_ids(ids)[None])
        row = rt.embed_ids([5])[None]
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            binding.step(row, trusted=True)
        rt.pool.release(slot)
        return (time.perf_counter() - t0) / (NEW - 1)

    g_ms, o_ms, b_ms, n_ms = [], [], [], []
    for _ in range(rounds):
        ttft, total = genai()
        g_ms.append((total - ttft) / (NEW - 1) * 1000)
        o_ms.append(rt.generate(ids, cfg).decode_s / (NEW - 1) * 1000)
        b_ms.append(bare() * 1000)
        if native is not None:
            n_ms.append(native.generate(ids, cfg).decode_s / (NEW - 1) * 1000)
    ratios = np.array(g_ms) / np.array(o_ms)
    out = {
        "rounds": rounds,
        "genai_ms_per_token": median(g_ms),
        "omniforge_ms_per_token": median(o_ms),
        "omniforge_bare_step_ms": median(b_ms),
        "ratio_median": float(np.median(ratios)),
        "ratio_p25": float(np.percentile(ratios, 25)),
        "ratio_p75": float(np.percentile(ratios, 75)),
    }
    if n_ms:
        native_ratios = np.array(g_ms) / np.array(n_ms)
        out |= {
            "native_ms_per_token": median(n_ms),
            "native_ratio_median": float(np.median(native_ratios)),
            "native_ratio_p25": float(np.percentile(native_ratios, 25)),
            "native_ratio_p75": float(np.percentile(native_ratios, 75)),
        }
    return out


def context_scaling(build: Path, threads: int, long_ctx: int = 2048, steps: int = 32) -> dict:
    """Per-token decode latency after a 64-token and a 2048-token context."""
    from omniforge.runtime.sampling import GenerationConfig

    rt = single_runtime(build, threads, long_ctx + steps + 8)
    cfg = GenerationConfig(max_new_tokens=steps, stop_token_ids=())
    out = {}
    for ctx in (64, long_ctx):
        prompt = prompt_ids(ctx, seed=1)
        runs = [1000 / rt.generate(prompt, cfg).decode_tokens_per_s for _ in range(3)]
        out[f"ms_per_token_ctx{ctx}"] = median(runs)
    out["ratio"] = out[f"ms_per_token_ctx{long_ctx}"] / out["ms_per_token_ctx64"]
    return out


def prefix_reuse(build: Path, threads: int, prefix: int = 512) -> dict:
    """Time to first token of turn 1 vs turn 2 of a conversation over a 512-token media prefix."""
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    rt = LlmRuntime(build, num_slots=3, prefix_cache_entries=2, session=SessionConfig(threads=threads))
    h = rt.geometry.hidden_size
    media = np.random.default_rng(2).standard_normal((prefix - 16, h)).astype(np.float32) * 0.02
    system = rt.embed_ids(prompt_ids(16, seed=3))
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    turn1 = np.concatenate([system, media])  # a conversation's rows: turn 1, its reply, turn 2
    t1 = rt.generate_rows([turn1], [[]], cfg, adapters=[None])[0]
    turn2 = np.concatenate([turn1, rt.embed_ids(t1.token_ids), rt.embed_ids(prompt_ids(12, seed=4))])
    t2 = rt.generate_rows([turn2], [[]], cfg, adapters=[None])[0]
    return {
        "prefix_tokens": prefix,
        "turn1_ttft_ms": t1.ttft_s * 1000,
        "turn2_ttft_ms": t2.ttft_s * 1000,
        "turn2_reused_tokens": t2.reused_prefix_tokens,
        "ratio": t1.ttft_s / t2.ttft_s,
    }


RUNNERS = {
    "transformers": lambda a, w: bench_transformers(w / "llama-150m", a.threads),
    "plain-ort": lambda a, w: bench_plain_ort(w / "build-150m", a.threads),
    "genai-fp32": lambda a, w: bench_genai(w / "genai-fp32"),
    "omniforge-fp32": lambda a, w: bench_omniforge(w / "build-150m", a.threads),
    "genai-int4": lambda a, w: bench_genai(w / "genai-int4"),
    "omniforge-int4": lambda a, w: bench_omniforge(w / "build-150m-int4", a.threads),
    "native-fp32": lambda a, w: bench_omniforge(w / "build-150m", a.threads, "native"),
    "native-int4": lambda a, w: bench_omniforge(w / "build-150m-int4", a.threads, "native"),
}


class Worker:
    """One runtime in a child process: ``run`` times one generation there and returns (ttft, total)."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--work",
            args.work,
            "--threads",
            str(args.threads),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", kind

    def run(self) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        ttft, total = json.loads(self.proc.stdout.readline())
        return ttft, total

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def worker_main(args: argparse.Namespace) -> None:
    fn = RUNNERS[args.worker](args, Path(args.work))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(fn()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench", help="where models and builds are written")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-int4", action="store_true", help="skip the INT4 builds")
    ap.add_argument(
        "--native-library", help="libomniforge for the native-loop rows (default: where LlmRuntime finds it)"
    )
    ap.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.native_library:
        os.environ["OMNIFORGE_NATIVE_LIBRARY"] = str(
            Path(args.native_library).resolve()
        )  # workers inherit it
    from omniforge.runtime.native import find_library

    native = find_library() is not None
    if args.worker:
        worker_main(args)
        return
    work = Path(args.work)
    folder = make_model(work / "llama-150m")
    build = work / "build-150m"
    if not (build / "manifest.json").is_file():
        from omniforge.export.exporter import export_pipeline

        export_pipeline(folder, build, log=lambda m: print(m, file=sys.stderr))
    from omniforge.runtime.build import Build

    g = Build(build).pipeline.stage("llm").llm
    params = (
        g.num_layers
        * (
            g.hidden_size * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim
            + g.num_heads * g.head_dim * g.hidden_size
            + 3 * g.hidden_size * SHAPE["intermediate_size"]
            + 2 * g.hidden_size
        )
        + g.hidden_size
        + g.hidden_size * g.vocab_size
    )
    bw = read_bandwidth(args.threads)
    bound = bw / (params * 4)
    kinds = {
        "transformers eager fp32": "transformers",
        "plain ONNX Runtime loop fp32 (canonical export)": "plain-ort",
    }
    if build_genai(folder, work / "genai-fp32", args.threads) is not None:
        kinds["ONNX Runtime GenAI fp32"] = "genai-fp32"
    kinds["omniforge fp32"] = "omniforge-fp32"
    if native:
        kinds["omniforge fp32, native loop"] = "native-fp32"
    if not args.no_int4:
        build4 = work / "build-150m-int4"
        if not (build4 / "manifest.json").is_file():
            from omniforge.calibration.quantize import quantize_build

            quantize_build(build, build4, "int4", log=lambda m: print(m, file=sys.stderr))
        if build_genai(folder, work / "genai-int4", args.threads, precision="int4") is not None:
            kinds["ONNX Runtime GenAI int4"] = "genai-int4"
        kinds["omniforge int4"] = "omniforge-int4"
        if native:
            kinds["omniforge int4, native loop"] = "native-int4"
    genai = "ONNX Runtime GenAI fp32" in kinds
    # every runtime in its own process (no thread pools competing across runtimes), run in
    # interleaved rounds so drift on a shared machine hits all of them alike
    print("starting one worker process per runtime ...", file=sys.stderr)
    workers = {name: Worker(kind, args) for name, kind in kinds.items()}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in workers}
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs} ...", file=sys.stderr)
        for name, w in workers.items():
            time.sleep(0.5)
            w.run()  # warm this runtime's caches again after the others ran
            samples[name].append(w.run())
    for w in workers.values():
        w.close()
    rows: dict[str, dict] = {k: summarize([a for a, _ in v], [b for _, b in v]) for k, v in samples.items()}
    if importlib.util.find_spec("optimum") is None:
        rows["Optimum ORTModelForCausalLM fp32"] = {
            "skipped": "optimum not installed (it pins transformers < 4.58)"
        }
    print("context scaling and prefix reuse ...", file=sys.stderr)
    ctx = context_scaling(build, args.threads)
    prefix = prefix_reuse(build, args.threads)
    of = rows["omniforge fp32"]["decode_tok_s"]
    bound4 = bw / (params * (0.5 + 4 / 32))  # 4-bit weights + one fp32 scale per block of 32
    data = {
        "machine": machine(),
        "settings": {
            "prompt": PROMPT,
            "new_tokens": NEW,
            "runs": args.runs,
            "threads": args.threads,
            "model": SHAPE,
        },
        "weights_read_per_token_params": params,
        "read_bandwidth_GBps": bw / 1e9,
        "fp32_bound_tok_s": bound,
        "results": rows,
        "omniforge_vs_bound": of / bound,
        "omniforge_vs_genai": of / rows["ONNX Runtime GenAI fp32"]["decode_tok_s"] if genai else None,
        "int4_bound_tok_s": bound4,
        "context_scaling": ctx,
        "prefix_reuse": prefix,
    }
    md = [
        "# LLM decode, 150M LLaMA-shaped model (batch 1, prompt 32, 64 new tokens, fp32)",
        "",
        f"Machine: {data['machine'].get('cpu', '?')}, {args.threads} threads. Median of {args.runs} runs.",
        "",
        "| runtime | time to first token (ms) | decode tok/s | end-to-end tok/s | spread |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "skipped" in r:
            md.append(f"| {name} | - | - | - | {r['skipped']} |")
        else:
            md.append(
                f"| {name} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} | {r['spread']:.0%} |"
            )
    md += [
        "",
        f"- fp32 bandwidth bound: {params / 1e6:.1f}M weights read per token x 4 bytes over a measured "
        f"{bw / 1e9:.1f} GB/s memory read bandwidth = **{bound:.1f} tok/s**; omniforge achieved "
        f"**{100 * data['omniforge_vs_bound']:.0f}%** of the bandwidth bound.",
    ]
    if genai:
        md.append(
            f"- omniforge / ONNX Runtime GenAI decode speed, fp32: **{data['omniforge_vs_genai']:.2f}x**."
        )
    if "omniforge int4" in rows:
        o4 = rows["omniforge int4"]["decode_tok_s"]
        data["omniforge_int4_vs_bound"] = o4 / bound4
        line = f"- INT4 (block 32, symmetric, accuracy level 4): omniforge {o4:.0f} tok/s = {100 * o4 / bound4:.0f}% of the INT4 bound ({bound4:.0f} tok/s)"
        if "ONNX Runtime GenAI int4" in rows:
            g4 = rows["ONNX Runtime GenAI int4"]["decode_tok_s"]
            data["omniforge_int4_vs_genai_int4"] = o4 / g4
            line += f"; ONNX Runtime GenAI INT4 {g4:.0f} tok/s; ratio **{o4 / g4:.2f}x**"
        md.append(line + ".")
        if "ONNX Runtime GenAI int4" in rows:
            print("paired INT4 rounds in one process ...", file=sys.stderr)
            pair = paired_int4(
                work / "build-150m-int4", work / "genai-int4", args.threads, with_native=native
            )
            data["int4_paired"] = pair
            md.append(
                f"- INT4 paired in one process ({pair['rounds']} alternating rounds): omniforge / GenAI speed "
                f"**{pair['ratio_median']:.2f}x** (p25-p75 {pair['ratio_p25']:.2f}-{pair['ratio_p75']:.2f}); "
                f"per token {pair['omniforge_ms_per_token']:.2f} vs {pair['genai_ms_per_token']:.2f} ms; "
                f"omniforge's bare decode step in a loop: {pair['omniforge_bare_step_ms']:.2f} ms."
            )
            if "native_ratio_median" in pair:
                md.append(
                    f"- INT4 paired, the native loop (same rounds, same tokens): omniforge native / GenAI speed "
                    f"**{pair['native_ratio_median']:.2f}x** (p25-p75 {pair['native_ratio_p25']:.2f}-"
                    f"{pair['native_ratio_p75']:.2f}); per token {pair['native_ms_per_token']:.2f} ms."
                )
        sizes = json.loads((work / "build-150m-int4" / "quantize.json").read_text())
        llm_q = next(r for r in sizes if r["stage"] == "llm")
        emb_q = next(r for r in sizes if r["stage"] == "token_embedding")
        ratio = (llm_q["size_after"] + emb_q["size_after"]) / (llm_q["size_before"] + emb_q["size_before"])
        data["int4_size_ratio"] = ratio
        md.append(f"- INT4 model size (LLM + INT8 embedding table) / FP32: **{ratio:.2f}x**.")
    md += [
        f"- per-token latency at context 2048 vs 64: {ctx['ms_per_token_ctx2048']:.1f} ms vs "
        f"{ctx['ms_per_token_ctx64']:.1f} ms = **{ctx['ratio']:.2f}x** (the cache is written in place; "
        "only attention grows with the context).",
        f"- second conversation turn over a {prefix['prefix_tokens']}-token prefix: time to first token "
        f"{prefix['turn1_ttft_ms']:.0f} ms -> {prefix['turn2_ttft_ms']:.1f} ms = **{prefix['ratio']:.0f}x** lower "
        f"({prefix['turn2_reused_tokens']} tokens reused).",
    ]
    j, m = write_results("llm_decode", data, "\n".join(md))
    print("\n".join(md))
    print(f"\nwritten: {j}, {m}", file=sys.stderr)


if __name__ == "__main__":
    main()
