"""End-to-end accuracy of a quantized build against its FP32 build: the same prompts and seeds
through both pipelines, every decoder forced.

Reported per prompt and as the worst case: generated-token agreement, PSNR of the image and of
the video frames against the FP32 pipeline's, and SNR of the audio waveform. The prompts are
held out from calibration (``omniforge.calibration.corpus``): NExT-GPT-style media requests for a
pipeline with decoders, plain text for a text-only model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omniforge.calibration.corpus import heldout_lines
from omniforge.calibration.metrics import psnr, snr_db


def heldout_prompts(count: int = 3, media: bool = True) -> list[str]:
    """Prompts no calibration saw: media requests, or plain text for a text-only model."""
    return heldout_lines(media)[:count]


def end_to_end_accuracy(
    fp32: str | Path,
    quantized: str | Path,
    prompts: list[str] | None = None,
    steps: int = 8,
    tokens: int = 12,
) -> dict:
    """{"prompts": [...per-prompt metrics], "worst": {...}} for ``quantized`` against ``fp32``."""
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    ref_pipe, got_pipe = Pipeline(fp32, num_slots=1), Pipeline(quantized, num_slots=1)
    force = sorted(ref_pipe.modalities_in())
    prompts = prompts or heldout_prompts(media=bool(force))
    rows = []
    for i, prompt in enumerate(prompts):
        kw = dict(
            generation=GenerationConfig(max_new_tokens=tokens, stop_token_ids=()),
            diffusion=DiffusionConfig(steps=steps, seed=i),
            force=force,
        )
        a, b = ref_pipe.run(prompt, **kw), got_pipe.run(prompt, **kw)
        ta, tb = a.generation.token_ids, b.generation.token_ids
        row = {
            "prompt": prompt,
            "token_agreement": float(np.mean([x == y for x, y in zip(ta, tb, strict=False)])),
        }
        if a.images:
            row["image_psnr_db"] = psnr(a.images[0], b.images[0])
        if a.videos:
            row["video_psnr_db"] = psnr(a.videos[0], b.videos[0])
        if a.audios:
            row["audio_snr_db"] = snr_db(a.audios[0], b.audios[0])
        rows.append(row)
    keys = [k for k in rows[0] if k != "prompt"]
    return {"steps": steps, "prompts": rows, "worst": {k: min(r[k] for r in rows) for k in keys}}


def end_to_end_table(result: dict) -> str:
    keys = list(result["worst"])
    lines = ["| prompt | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for r in result["prompts"]:
        lines.append(f"| {r['prompt'][:40]} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    lines.append("| **worst** | " + " | ".join(f"**{result['worst'][k]:.3g}**" for k in keys) + " |")
    return "\n".join(lines)
