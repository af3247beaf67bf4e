"""``omniforge import nextgpt``: NExT-GPT's released checkpoints -> an omniforge model folder."""

from __future__ import annotations

import argparse

from omniforge.cli._common import log


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert released checkpoints into an omniforge model folder",
        description="Convert a model family's released checkpoints (local paths only) into an "
        "omniforge model folder that export, build and run take.",
    )
    kinds = p.add_subparsers(dest="family", metavar="FAMILY", required=True)
    n = kinds.add_parser(
        "nextgpt",
        help="NExT-GPT: Vicuna + ImageBind + the delta checkpoint + diffusers decoders",
        description="Read NExT-GPT's release files and write a model folder (nextgpt.json, the "
        "LLM with the delta's resized embeddings, its LoRA as a peft adapter, ImageBind's vision "
        "and audio encoders, the projectors, and the decoders). Pickled files are opened with "
        "torch's weights-only loader and written as safetensors; the folder is written atomically.",
    )
    n.add_argument("--vicuna", required=True, metavar="DIR", help="the Vicuna (LLaMA) HF folder")
    n.add_argument("--imagebind", required=True, metavar="FILE", help="imagebind_huge.pth")
    n.add_argument(
        "--delta", required=True, metavar="DIR_OR_FILE", help="NExT-GPT's pytorch_model.pt or its folder"
    )
    for m, what in (("image", "Stable Diffusion"), ("video", "ZeroScope"), ("audio", "AudioLDM")):
        n.add_argument(
            f"--{m}-decoder", metavar="DIR", help=f"the {what} diffusers folder (left out: no {m} output)"
        )
    n.add_argument("--out", required=True, metavar="MODEL", help="the model folder to write")
    n.add_argument(
        "--lora-alpha",
        type=float,
        default=32.0,
        help="LoRA alpha (not stored in the checkpoint; NExT-GPT's released value 32)",
    )
    n.add_argument(
        "--keep-lora",
        action="store_true",
        help="keep the LoRA adapter separate instead of merging it at export",
    )
    n.add_argument("--max-context", type=int, default=512, help="the context the build serves (default 512)")
    n.add_argument("--vision-heads", type=int, default=16, help="ImageBind vision heads (huge: 16)")
    n.add_argument("--audio-heads", type=int, default=12, help="ImageBind audio heads (huge: 12)")
    n.add_argument(
        "--projector-heads",
        type=int,
        help="output projector heads (default: 4 for transformer mode, 12 for qformer mode)",
    )
    n.add_argument(
        "--copy-decoders",
        action="store_true",
        help="copy the decoders into the model folder (default: reference them where they lie)",
    )
    n.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omniforge.importers.nextgpt import ImportOptions, import_nextgpt

    decoders = {
        m: Path(getattr(args, f"{m}_decoder"))
        for m in ("image", "video", "audio")
        if getattr(args, f"{m}_decoder")
    }
    opts = ImportOptions(
        vicuna=Path(args.vicuna),
        imagebind=Path(args.imagebind),
        delta=Path(args.delta),
        out=Path(args.out),
        decoders=decoders,
        lora_alpha=args.lora_alpha,
        merge_lora=not args.keep_lora,
        max_context=args.max_context,
        vision_heads=args.vision_heads,
        audio_heads=args.audio_heads,
        projector_heads=args.projector_heads,
        copy_decoders=args.copy_decoders,
    )
    summary = import_nextgpt(opts, log=log)
    print(summary.table())
    tokens = ", ".join(f"{t}={i}" for t, i in list(summary.added_tokens.items())[:6])
    more = len(summary.added_tokens) - 6
    print(f"added tokens: {len(summary.added_tokens)} ({tokens}{f', ... {more} more' if more > 0 else ''})")
    if summary.tags:
        print("media tags stored as: " + ", ".join(f"{k} -> {v!r}" for k, v in summary.tags.items()))
    for note in summary.notes:
        print(f"note: {note}")
    print(f"model folder written to {args.out}")
    return 0
