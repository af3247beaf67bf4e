"""``omniforge run``: generate from a build with the torch-free runtime, streaming the text."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="generate text from a build (torch-free runtime)",
        description="Run the build's LLM with the torch-free runtime: the text streams to stdout, "
        "timings go to stderr.",
    )
    p.add_argument("build", help="build folder (from `omniforge export`)")
    p.add_argument("--prompt", "-p", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (1 = off)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = one per core)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=tuple(args.stop),
    )
    runtime = LlmRuntime(
        args.build, num_slots=1, prefix_cache_entries=0, session=SessionConfig(threads=args.threads)
    )

    def emit(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = runtime.generate(args.prompt, cfg, on_text=emit)
    sys.stdout.write("\n")
    print(
        f"[{result.prompt_tokens} prompt tokens, {result.new_tokens} new, finish: {result.finish_reason}; "
        f"time to first token {result.ttft_s * 1000:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0
