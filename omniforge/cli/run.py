"""``omniforge run``: the torch-free runtime from the command line.

Text streams to stdout; generated media are written to ``--out``; timings go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniforge.runtime.pipeline import Pipeline
    from omniforge.runtime.tokenizer import SignalEvent


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a build: prompt (+ image/audio/video) in, text and media out (torch-free)",
        description="Run a build with the torch-free runtime. The text streams to stdout; images, "
        "videos and audio the model asks for (through its signal tokens, or forced with --force) "
        "are written to --out; per-stage timings are printed at the end.",
    )
    p.add_argument("build", help="build folder (from `omniforge export`)")
    p.add_argument("--prompt", "-p", required=True, help="prompt text")
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the prompt as one user message through the build's chat template (default: when "
        "the build has one and no conversation protocol); --no-chat-template sends it raw",
    )
    p.add_argument("--system", help="a system message before the prompt (with the chat template)")
    p.add_argument("--image", help="input image file")
    p.add_argument("--audio", help="input WAV file")
    p.add_argument(
        "--video",
        help="input video: a folder of frames, a GIF, or an MP4/MOV/MKV/WebM/AVI file (with the "
        "'video' extra: PyAV); a video file's sound track is encoded beside its frames when the build "
        "has an audio encoder (a build without one encodes the frames alone)",
    )
    p.add_argument(
        "--video-audio",
        metavar="TRACK",
        help="the --video's sound track, encoded by the audio encoder beside the frames: a WAV file, "
        "or a video file's audio stream (it replaces the --video file's own track); 'none': the "
        "frames alone",
    )
    p.add_argument("--out", default="outputs", help="folder for generated media (default: outputs)")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        choices=["image", "video", "audio"],
        help="generate this modality even if the model emits no signal tokens for it (repeatable)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="denoising steps (default 20; the build's scheduler config sets the most it can take, "
        "999 for DDIM over 1000 training timesteps)",
    )
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument(
        "--scheduler", default="ddim", choices=["ddim", "euler", "dpm"], help="diffusion scheduler"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and diffusion noise (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (1 = off)"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--adapter",
        default="auto",
        help="LoRA adapter the LLM runs with: a name, 'none', or 'auto' (by the media given and "
        "--force; default)",
    )
    p.add_argument("--low-memory", action="store_true", help="release each decoder after use")
    p.add_argument(
        "--memory-budget",
        help="follow `omniforge plan`'s plan for this budget (e.g. 8GiB): stages it does not keep "
        "resident are opened for the request and closed after it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads (0 = one per core; at most 4 per core)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.runtime.build import Build
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline, check_output_folder
    from omniforge.runtime.sampling import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=tuple(args.stop),
    )
    diffusion = DiffusionConfig(
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed, scheduler=args.scheduler
    )
    session = SessionConfig(threads=args.threads)
    pipe = Pipeline(
        Build(args.build, session), low_memory=args.low_memory, num_slots=1, memory_budget=args.memory_budget
    )
    if pipe.modalities_in():  # media may be generated: --out must take them, known before generating
        check_output_folder(args.out)

    def emit(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = pipe.run(
        chat_prompt(pipe, args),
        image=args.image,
        audio=args.audio,
        video=args.video,
        video_audio=False if args.video_audio == "none" else args.video_audio,
        generation=gen,
        diffusion=diffusion,
        force=args.force,
        on_text=emit,
        adapter=args.adapter,
    )
    sys.stdout.write("\n")
    for warning in result.warnings:
        print(f"omniforge: warning: {warning}", file=sys.stderr)
    for line in modality_lines(result.signals, result.save(args.out)):
        print(line, file=sys.stderr)
    g = result.generation
    print(
        f"[{g.prompt_tokens} prompt tokens, {g.new_tokens} new, finish: {g.finish_reason}"
        f"{f', adapter: {g.adapter}' if g.adapter else ''}; "
        f"time to first token {g.ttft_s * 1000:.1f} ms, decode {g.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items() if k != "total")
    print(f"[stages: {timings}; total {result.timings['total'] * 1000:.0f} ms]", file=sys.stderr)
    return 0


def chat_prompt(pipe: Pipeline, args: argparse.Namespace) -> str:
    """``--prompt`` as the LLM reads it: raw, or one user message (after ``--system``) rendered by
    the build's chat template, with the placeholder of each medium given in that message."""
    from omniforge.errors import ConfigError
    from omniforge.runtime.chat_template import use_chat_template

    llm = pipe.llm
    has_template = llm.tokenizer is not None and llm.tokenizer.has_chat_template
    if not use_chat_template(args.chat_template, has_template, llm.protocol is not None):
        if args.system is not None:
            raise ConfigError("--system needs the chat template, and this run sends the prompt raw")
        return args.prompt
    if llm.protocol is not None:
        raise ConfigError(
            "this build's conversation protocol lays out the prompt itself: drop --chat-template"
        )
    text = args.prompt
    for modality in ("image", "audio", "video"):  # as Pipeline.run places them in a raw prompt
        tag = pipe.build.pipeline.placeholders.get(modality, f"<{modality}>")
        if getattr(args, modality) is not None and tag not in text:
            text = f"{tag} {text}"
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return llm.apply_chat_template([*system, {"role": "user", "content": text}])


def modality_lines(signals: list[SignalEvent], written: list[Path]) -> list[str]:
    """One line per modality the run produced or asked for: its signal tokens and its files."""
    lines = []
    for modality in ("image", "video", "audio"):
        count = sum(e.modality == modality for e in signals)
        # frames are listed through their GIF
        files = [
            str(p) for p in written if p.name.startswith(f"{modality}_") and "_frames" not in p.parent.name
        ]
        if not count and not files:
            continue
        why = f"{count} signal token{'s' if count != 1 else ''}" if count else "forced"
        lines.append(f"{modality}: {why} -> {', '.join(files) if files else 'no decoder in this build'}")
    return lines
