"""A BLIP-2 Q-Former as the image encoder: the stage equals transformers' ``get_qformer_features``
(without loading the language model), the numpy front end equals ``BlipImageProcessor``, and a
model folder using it is exported and run by the torch-free runtime (image and video input)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.encoder_variants import export_with_encoder


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from omniforge.model.families import write_blip2

    folder = tmp_path_factory.mktemp("blip2") / "blip2"
    return folder, write_blip2(folder)


def test_stage_equals_transformers_qformer_features(blip2):
    from omniforge.model.qformer_encoder import load_blip2_encoder

    folder, model = blip2
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        want = model.get_qformer_features(pixel_values=x)
        want = getattr(want, "last_hidden_state", want)
        got = load_blip2_encoder(folder)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_front_end_equals_blip_image_processor(blip2):
    from transformers import BlipImageProcessor

    from omniforge.export.exporter import blip_frontend
    from omniforge.runtime.image_frontends import resize_normalize

    folder, _ = blip2
    pic = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 47, 3), dtype=np.uint8))
    want = BlipImageProcessor.from_pretrained(folder)(pic, return_tensors="np").pixel_values[0]
    np.testing.assert_allclose(resize_normalize(pic, blip_frontend(folder)), want, atol=1e-5)


def test_blip2_image_encoder_end_to_end(blip2, default_model, tmp_path):
    from transformers import BlipImageProcessor

    from omniforge.runtime.pipeline import Pipeline

    folder, model = blip2

    def place(root):
        shutil.copytree(folder, root / "blip2")
        return "blip2"

    build, proj, root = export_with_encoder(default_model, tmp_path, "image", place, 32)
    hidden = json.loads((root / "llm" / "config.json").read_text())["hidden_size"]

    pic = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    pic.save(tmp_path / "p.png")
    pipe = Pipeline(build)
    rows = pipe.encode_image(tmp_path / "p.png")
    x = BlipImageProcessor.from_pretrained(folder)(pic, return_tensors="pt").pixel_values
    with torch.no_grad():
        q = model.get_qformer_features(pixel_values=x)
        want = proj(getattr(q, "last_hidden_state", q))[0].numpy()
    assert rows.shape == (4, hidden)  # one row per query token
    np.testing.assert_allclose(rows, want, atol=1e-4)
    frames = [pic, pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=100)
    assert pipe.encode_video(tmp_path / "v.gif").shape == (4, hidden)
    assert pipe.run("what is in <image>", image=tmp_path / "p.png").generation.prompt_tokens >= 4
