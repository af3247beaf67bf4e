"""The PyTorch eager reference of the end-to-end run ``omniforge bench`` times: the same weights
through transformers (a CLIP or BLIP-2 image encoder, the LLM's ``generate``), the projectors, and
diffusers' ``StableDiffusionPipeline`` with the same conditioning and steps. Imports torch: runs in
its own process. A model it cannot mirror (no image encoder or Stable Diffusion decoder, an
ImageBind encoder) gets ``{"skipped": reason}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from omniforge.bench.measure import PROMPT


def run_reference(model: Path, steps: int, new_tokens: int, threads: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer

    from omniforge.export.exporter import blip_frontend
    from omniforge.model.loader import load_component
    from omniforge.pipeline.describe import encoder_kind
    from omniforge.pipeline.model_config import load_model_config
    from omniforge.runtime.image_frontends import resize_normalize
    from omniforge.runtime.media import preprocess_image

    torch.set_num_threads(threads)
    cfg = load_model_config(model)
    kind = encoder_kind(cfg.encoders["image"]) if "image" in cfg.encoders else None
    if kind not in ("clip", "blip-2") or "image" not in cfg.decoders or "image" not in cfg.output_projectors:
        return {
            "skipped": "the reference mirrors a CLIP or BLIP-2 image encoder and a Stable Diffusion decoder"
        }
    enc = load_component(cfg, "encoders.image")
    proj = load_component(
        cfg, "input_projectors.image" if "image" in cfg.input_projectors else "input_projector"
    )
    llm = load_component(cfg, "llm", cfg.merge_adapter)
    out_proj = load_component(cfg, "output_projectors.image")
    tok = AutoTokenizer.from_pretrained(cfg.llm)
    folder = cfg.decoders["image"]
    sd = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    picture = np.full((32, 32, 3), 127, np.uint8)
    if kind == "blip-2":  # N query rows per image
        pre = blip_frontend(cfg.encoders["image"])
        encode = lambda x: enc(x)  # noqa: E731
        pixels = lambda: resize_normalize(picture, pre)  # noqa: E731
    else:  # one pooled row
        pre = json.loads((cfg.encoders["image"] / "preprocessor_config.json").read_text())
        encode = lambda x: enc(pixel_values=x).image_embeds[:, None]  # noqa: E731
        pixels = lambda: preprocess_image(picture, pre)  # noqa: E731
    signal = [tok.convert_tokens_to_ids(t) for t in cfg.signal_tokens["image"]]

    def once() -> dict[str, float]:
        t: dict[str, float] = {}
        with torch.no_grad():
            t0 = time.perf_counter()
            rows = proj(encode(torch.from_numpy(pixels())[None]))[0]
            t["image_encoder+input_projector"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ids = tok(f"<image> {PROMPT}", add_special_tokens=False, return_tensors="pt").input_ids
            emb = llm.get_input_embeddings()(ids)[0]
            pos = int((ids[0] == tok.convert_tokens_to_ids("<image>")).nonzero()[0])
            prompt = torch.cat([emb[:pos], rows, emb[pos + 1 :]])[None]
            gen = llm.generate(
                inputs_embeds=prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            full = torch.cat(
                [prompt, llm.get_input_embeddings()(torch.cat([gen[0], torch.tensor(signal)]))[None]], 1
            )
            hidden = llm(inputs_embeds=full, output_hidden_states=True).hidden_states[-1][:, -len(signal) :]
            t["llm"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cond = out_proj(hidden)
            t["image_output_projector"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sd(
                prompt_embeds=cond,
                negative_prompt_embeds=torch.zeros_like(cond),
                num_inference_steps=steps,
                guidance_scale=7.5,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            )
            t["image decoder (diffusers)"] = time.perf_counter() - t0
        return t

    once()
    runs = [once() for _ in range(3)]
    totals = [sum(r.values()) for r in runs]
    mid = runs[int(np.argsort(totals)[1])]
    return {"total_ms": float(np.median(totals)) * 1000, "stages_ms": {k: v * 1000 for k, v in mid.items()}}


def main() -> None:
    """python -m omniforge.bench.reference MODEL STEPS TOKENS THREADS OUT.json"""
    model, steps, tokens, threads, out = sys.argv[1:6]
    Path(out).write_text(json.dumps(run_reference(Path(model), int(steps), int(tokens), int(threads))))


if __name__ == "__main__":
    main()
