"""A tiny seeded CogVideoX decoder folder, written with diffusers' own ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

TEXT_LENGTH, TEXT_DIM = 77, 32  # the tiny default's video output projector gives 77 x 32
LATENT = (5, 4, 8, 8)  # latent frames, channels, rows, columns: 17 frames of 32 x 32 pixels
# five latent frames: the VAE decodes them in two batches (3 + 2, as 13 = 3 + 2 + 2 + ...), its
# causal convolution caches carried from the first to the second


def write_cogvideox(
    folder: Path,
    rotary: bool = True,
    scheduler: str = "CogVideoXDDIMScheduler",
    text_dim: int = TEXT_DIM,
    seed: int = 0,
    **scheduler_options: object,
) -> Path:
    """``transformer/``, ``vae/`` and ``scheduler/`` of a 2-layer CogVideoX (CogVideoX-5b's layout
    with ``rotary``, else CogVideoX-2b's sin-cos positions), with norms and biases perturbed."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    frames, channels, h, w = LATENT
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=channels,
        time_embed_dim=16,
        text_embed_dim=text_dim,
        num_layers=2,
        sample_width=w,
        sample_height=h,
        sample_frames=(frames - 1) * 4 + 1,
        patch_size=2,
        max_text_seq_length=TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=h * 4,
        sample_width=w * 4,
    )
    with torch.no_grad():  # fresh zero-initialised output layers would hide errors
        for m in (transformer, vae):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    transformer.eval().save_pretrained(folder / "transformer")
    vae.eval().save_pretrained(folder / "vae")
    options = {
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "snr_shift_scale": 3.0,
        **scheduler_options,
    }
    getattr(diffusers, scheduler)(**options).save_pretrained(folder / "scheduler")
    return folder
