"""The CogVideoX transformer as an exported stage, with its positional rotary tables baked in."""

from __future__ import annotations

import torch
from torch import nn

from omniforge.pipeline.spec import StageSpec


def rotary_tables(
    transformer: nn.Module, frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the 3D rotary embedding for ``frames`` x ``height`` x ``width`` latents, as
    ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` computes them (CogVideoX 1.0)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = transformer.config
    p = c.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, c.sample_width // p, c.sample_height // p)
    return get_3d_rotary_pos_embed(
        embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=grid, temporal_size=frames
    )


class CogVideoXDenoiser(nn.Module):
    """(latents (B, F, C, h, w), timestep (B,), encoder_hidden_states (B, L, D)) -> the transformer's
    prediction; the rotary tables (when the config uses them) are constants of the fixed shape."""

    def __init__(self, transformer: nn.Module, stage: StageSpec) -> None:
        super().__init__()
        self.transformer = transformer
        _, _, _, h, w = stage.inputs[0].shape
        frames = stage.dim("frames").opt
        self.rotary = bool(transformer.config.use_rotary_positional_embeddings)
        if self.rotary:
            cos, sin = rotary_tables(transformer, frames, int(h), int(w))
            self.register_buffer("cos", cos.float(), persistent=False)
            self.register_buffer("sin", sin.float(), persistent=False)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rotary = (self.cos, self.sin) if self.rotary else None
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=cond,
            timestep=timestep,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]


def scheduler_table(cfg: dict) -> list[float]:
    """The alphas_cumprod table a CogVideoX scheduler config gives in diffusers (SNR shift, zero
    terminal SNR rescale), kept in float64 as diffusers computes it."""
    import diffusers

    cls = getattr(diffusers, cfg["_class_name"])
    return [float(a) for a in cls.from_config(cfg).alphas_cumprod.double().tolist()]
