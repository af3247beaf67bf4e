"""Served through Triton vs in process: per-token latency of one stream, and 16 clients at once.

usage: python benchmarks/serving_overhead.py [--work /tmp/omniforge-bench] [--precision int4]
       [--new 64] [--rounds 15]

Uses the 150M LLaMA-shaped model of ``llm_decode.py`` with one change: its tokenizer covers the
whole vocabulary (the 512 trained tokens, then one BPE vocabulary entry, a space and a word, per
id up to 32000; no merges make them, so text encodes as before), so every
generated token adds visible text and the server streams one piece per token, as a real model's
does (with the 512-token tokenizer alone, most random tokens decode to nothing and the stream
would carry a piece every few dozen tokens). It writes a Triton repository for it (``omniforge triton``'s writer, the ``llm`` model only) and
starts ``tritonserver`` (``omniforge serve``'s launcher). Then, in interleaved rounds, one
greedy streamed request of ``--new`` tokens three ways: over gRPC through the server (the load
tool's client, ``omniforge bench --server``), in process through the same scheduler the server
runs (``ContinuousBatcher``, one stream), and in process through ``LlmRuntime.generate`` with a
streaming callback. Per-token latency = (last piece - first piece) / (tokens - 1); the medians
and the served / in-process ratios are reported (the target: at most 1.15x). Finally 16 clients
send 4 requests each at once: every request must succeed. Results go to
benchmarks/results/serving_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_results  # noqa: E402
from llm_decode import SHAPE, make_model  # noqa: E402

PROMPT = "The harbour at dawn, with boats leaving one by one"


def text_model(work: Path) -> Path:
    """The benchmark model's weights with a tokenizer that gives every id visible text."""
    import shutil

    from omniforge.model.tokenizer import save_tokenizer, train_tokenizer

    folder = work / "llama-150m-text"
    if (folder / "config.json").is_file():
        return folder
    base = make_model(work / "llama-150m")
    tmp = work / "llama-150m-text.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            (tmp / f.name).symlink_to(f.resolve())
    save_tokenizer(train_tokenizer(512), tmp)
    spec = json.loads((tmp / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), SHAPE["vocab_size"]):
        vocab[f"\u0120w{i}"] = i  # byte-level form of " w<i>"
    (tmp / "tokenizer.json").write_text(json.dumps(spec))
    tmp.rename(folder)
    return folder


def build(work: Path, precision: str) -> Path:
    import subprocess

    out = work / f"serving-{precision}"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "omniforge", "build", str(text_model(work)), "--out", str(out)]
        subprocess.run([*cmd, "--precision", precision], check=True)
    return out


def served_once(address: str, new: int) -> float:
    """Per-token seconds of one streamed request through the server."""
    from omniforge.serving.load import LoadOptions, run_load

    opts = LoadOptions(
        server=address, clients=(1,), kinds=("text",), requests=1, warmup=0, max_new_tokens=new,
        text_prompts=(PROMPT,),
    )  # fmt: skip
    sample = run_load(opts).levels[0].samples[0]
    if sample.error is not None or sample.per_token_s is None:
        raise SystemExit(f"the served request failed: {sample.error} {sample.message}")
    return sample.per_token_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request, >= 2 (default 64)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = ap.parse_args()
    if args.new < 2 or args.rounds < 1:
        ap.error("--new must be >= 2 and --rounds >= 1")
    from omniforge.runtime.batching import ContinuousBatcher
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig
    from omniforge.serving.load import LoadOptions, run_load
    from omniforge.serving.repository import RepositoryOptions, write_repository
    from omniforge.serving.server import ServerOptions, TritonServer, free_port

    work = Path(args.work)
    b = build(work, args.precision)
    repo = write_repository(b, work / f"serving-repo-{args.precision}", RepositoryOptions(llm_slots=4))
    ports = sorted({free_port() for _ in range(6)})[:3]
    options = ServerOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], models=["llm"])
    server = TritonServer(repo.path, options)
    server.start()
    try:
        print(f"tritonserver ready in {server.wait():.1f} s", file=sys.stderr)
        address = f"127.0.0.1:{ports[1]}"
        rt = LlmRuntime(b, num_slots=4, prefix_cache_entries=0, backend="python")
        cfg = GenerationConfig(max_new_tokens=args.new)  # the model's EOS stops it, as on the server

        def streamed(run) -> float:
            result = run(lambda _piece: None)  # streamed, as the server streams
            if result.new_tokens < 2:
                raise SystemExit(f"the in-process request stopped after {result.new_tokens} token")
            return result.decode_s / (result.new_tokens - 1)

        with ContinuousBatcher(rt) as batcher:
            runs = {
                "served (gRPC stream)": lambda: served_once(address, args.new),
                "in process, ContinuousBatcher": lambda: streamed(
                    lambda cb: batcher.submit(PROMPT, cfg, on_text=cb).result()
                ),
                "in process, LlmRuntime.generate": lambda: streamed(
                    lambda cb: rt.generate(PROMPT, cfg, on_text=cb)
                ),
            }
            for fn in runs.values():  # warm-up
                fn()
            samples: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    time.sleep(0.2)
                    samples[name].append(fn())
        print("16 clients x 4 requests ...", file=sys.stderr)
        many = (
            run_load(
                LoadOptions(
                    server=address, clients=(16,), kinds=("text",), requests=4, max_new_tokens=args.new
                )
            )
            .levels[0]
            .summary()
        )
    finally:
        server.stop()
    per_token = {k: 1000 * median(v) for k, v in samples.items()}
    served = per_token["served (gRPC stream)"]
    data = {
        "machine": machine(),
        "precision": args.precision,
        "new_tokens": args.new,
        "rounds": args.rounds,
        "per_token_ms": per_token,
        "served_vs_batcher": served / per_token["in process, ContinuousBatcher"],
        "served_vs_generate": served / per_token["in process, LlmRuntime.generate"],
        "sixteen_clients": many,
        "samples_ms": {k: [1000 * x for x in v] for k, v in samples.items()},
    }
    md = [
        f"# Served vs in process, 150M LLaMA-shaped model, {args.precision} ({args.new} new tokens, greedy, streamed)",
        "",
        f"Machine: {data['machine'].get('cpu', '')}, {data['machine'].get('cpus')} CPUs; median of "
        f"{args.rounds} interleaved rounds.",
        "",
        "| path | per-token latency (ms) |",
        "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in per_token.items()],
        "",
        f"Served / in process: **{data['served_vs_batcher']:.2f}x** against the same scheduler in process, "
        f"**{data['served_vs_generate']:.2f}x** against `LlmRuntime.generate` (target <= 1.15x).",
        "",
        f"16 clients x 4 requests at once: {many['ok']} of {many['requests']} succeeded, errors "
        f"{many['errors'] or 'none'}; {many['tokens_per_s']:.0f} tokens/s aggregate, per-token p50 "
        f"{many['per_token_ms_p50']:.1f} ms, end-to-end p99 {many['e2e_ms_p99']:.0f} ms.",
    ]
    paths = write_results(f"serving_overhead-{args.precision}", data, "\n".join(md))
    print("\n".join(md))
    print(f"written: {', '.join(map(str, paths))}", file=sys.stderr)


if __name__ == "__main__":
    main()
