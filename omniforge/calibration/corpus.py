"""The text shipped in ``omniforge/data/corpus.txt``, split once into calibration and held-out lines.

Calibration (the captured prompts and the AWQ/GPTQ text rows) reads only ``calibration_lines``;
end-to-end accuracy reads only the held-out lines, so a quantized build is never scored on text
it was calibrated on.
"""

from __future__ import annotations

from importlib import resources

# 1-based line numbers of the held-out lines: NExT-GPT-style requests for an image, a video and
# audio (for pipelines with decoders), and plain descriptive text (for text-only models)
HELDOUT_MEDIA = (16, 18, 38, 41)
HELDOUT_TEXT = (10, 26, 43)


def corpus_lines() -> list[str]:
    return resources.files("omniforge").joinpath("data/corpus.txt").read_text().splitlines()


def calibration_lines() -> list[str]:
    """Every non-empty line that is not held out."""
    held = set(HELDOUT_MEDIA + HELDOUT_TEXT)
    return [ln for i, ln in enumerate(corpus_lines(), 1) if ln.strip() and i not in held]


def heldout_lines(media: bool) -> list[str]:
    """The held-out media requests, or the held-out plain text."""
    lines = corpus_lines()
    return [lines[i - 1] for i in (HELDOUT_MEDIA if media else HELDOUT_TEXT)]
