"""The default model with one encoder swapped for another family, its own input projector, exported
with only the stages a text + that medium request needs (shared by the encoder-family tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def export_with_encoder(
    default_model: Path,
    tmp_path: Path,
    modality: str,
    place: Callable[[Path], str],
    width: int,
    frontend: dict | None = None,
) -> tuple[Path, torch.nn.Module, Path]:
    """``place(model_folder)`` writes the encoder and returns its folder name; returns the exported
    build, the seeded input projector (``width`` -> the LLM's hidden size) and the model folder."""
    from omniforge.model.projectors import InputProjector, InputProjectorConfig, save_module

    model = tmp_path / "model"
    shutil.copytree(default_model, model)
    encoder = place(model)
    hidden = json.loads((model / "llm" / "config.json").read_text())["hidden_size"]
    torch.manual_seed(1)
    proj = InputProjector(InputProjectorConfig(in_dim=width, out_dim=hidden)).eval()
    save_module(proj, model / f"{modality}_projector")
    desc = json.loads((model / "nextgpt.json").read_text())
    desc["encoders"][modality] = encoder
    desc["input_projectors"] = {modality: f"{modality}_projector"}
    if frontend is not None:
        desc["audio_frontend"] = frontend
    (model / "nextgpt.json").write_text(json.dumps(desc))
    build = tmp_path / "build"
    stages = f"token_embedding,llm,{modality}_encoder,{modality}_input_projector"
    proc = subprocess.run(
        [sys.executable, "-m", "omniforge", "export", str(model), "--out", str(build), "--stages", stages],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return build, proj, model
