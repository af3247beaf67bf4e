"""A small ``imagebind_huge.pth`` look-alike and an independent reference of its two encoders.

``make_imagebind_pth`` writes what ImageBind's ``imagebind_huge(pretrained=True)`` loads: a pickled
plain dict of tensors under the model's own ``state_dict()`` names and layouts, at small widths but
with the real input geometry (224x224 images in 14x14 patches over 2-frame clips: 257 positions;
128x204 fbank in 16x16 patches at stride 10: 229 positions), plus a few keys of the text, depth,
thermal and IMU encoders and the post-processors' logit scales, which an importer must drop.

``reference_vision`` / ``reference_audio`` compute the encoders from those tensors with plain
torch functional ops (no ``nn`` modules, no omniforge code), as ImageBind's ``forward`` does in eval
mode for one clip per row, without the audio logit scale (NExT-GPT drops it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

V = "modality_preprocessors.vision."
A = "modality_preprocessors.audio."
VISION_POSITIONS = 1 + (224 // 14) ** 2  # 257
AUDIO_POSITIONS = 1 + ((128 - 16) // 10 + 1) * ((204 - 16) // 10 + 1)  # 1 + 12 * 19 = 229


def _blocks(out: dict, g: torch.Generator, trunk: str, width: int, layers: int, bias_kv: bool) -> None:
    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    for i in range(layers):
        p = f"modality_trunks.{trunk}.blocks.{i}."
        out[p + "attn.in_proj_weight"] = rnd(3 * width, width, scale=width**-0.5)
        out[p + "attn.in_proj_bias"] = rnd(3 * width, scale=0.1)
        if bias_kv:
            out[p + "attn.bias_k"] = rnd(1, 1, width, scale=0.5)
            out[p + "attn.bias_v"] = rnd(1, 1, width, scale=0.5)
        out[p + "attn.out_proj.weight"] = rnd(width, width, scale=width**-0.5)
        out[p + "attn.out_proj.bias"] = rnd(width, scale=0.1)
        for norm in ("norm_1", "norm_2"):
            out[p + f"{norm}.weight"] = 1 + rnd(width, scale=0.1)
            out[p + f"{norm}.bias"] = rnd(width, scale=0.1)
        out[p + "mlp.fc1.weight"] = rnd(4 * width, width, scale=width**-0.5)
        out[p + "mlp.fc1.bias"] = rnd(4 * width, scale=0.1)
        out[p + "mlp.fc2.weight"] = rnd(width, 4 * width, scale=(4 * width) ** -0.5)
        out[p + "mlp.fc2.bias"] = rnd(width, scale=0.1)


def imagebind_state(
    vision_width: int = 32,
    vision_layers: int = 2,
    audio_width: int = 24,
    audio_layers: int = 2,
    embed_dim: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The state dict ``make_imagebind_pth`` saves."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    vw, aw = vision_width, audio_width
    s: dict[str, torch.Tensor] = {}
    # vision: PadIm2Video (no tensors) + Conv3d in a Sequential -> "proj.1"
    s[V + "cls_token"] = rnd(1, 1, vw, scale=vw**-0.5)
    s[V + "rgbt_stem.proj.1.weight"] = rnd(vw, 3, 2, 14, 14, scale=(3 * 2 * 14 * 14) ** -0.5)
    s[V + "pos_embedding_helper.pos_embed"] = rnd(1, VISION_POSITIONS, vw, scale=vw**-0.5)
    s["modality_trunks.vision.pre_transformer_layer.0.weight"] = 1 + rnd(vw, scale=0.1)
    s["modality_trunks.vision.pre_transformer_layer.0.bias"] = rnd(vw, scale=0.1)
    _blocks(s, g, "vision", vw, vision_layers, bias_kv=False)
    s["modality_heads.vision.0.weight"] = 1 + rnd(vw, scale=0.1)
    s["modality_heads.vision.0.bias"] = rnd(vw, scale=0.1)
    s["modality_heads.vision.2.weight"] = rnd(embed_dim, vw, scale=vw**-0.5)
    # audio: a one-element stem list is stored as "proj" itself; its LayerNorm is "norm_layer"
    s[A + "cls_token"] = rnd(1, 1, aw, scale=aw**-0.5)
    s[A + "rgbt_stem.proj.weight"] = rnd(aw, 1, 16, 16, scale=1 / 16)
    s[A + "rgbt_stem.norm_layer.weight"] = 1 + rnd(aw, scale=0.1)
    s[A + "rgbt_stem.norm_layer.bias"] = rnd(aw, scale=0.1)
    s[A + "pos_embedding_helper.pos_embed"] = rnd(1, AUDIO_POSITIONS, aw, scale=aw**-0.5)
    _blocks(s, g, "audio", aw, audio_layers, bias_kv=True)
    s["modality_heads.audio.0.weight"] = 1 + rnd(aw, scale=0.1)
    s["modality_heads.audio.0.bias"] = rnd(aw, scale=0.1)
    s["modality_heads.audio.2.weight"] = rnd(embed_dim, aw, scale=aw**-0.5)
    s["modality_postprocessors.audio.1.log_logit_scale"] = torch.tensor(math.log(20.0))
    # a few tensors of the encoders NExT-GPT does not use
    tw = 8
    s["modality_preprocessors.text.token_embedding.weight"] = rnd(64, tw, scale=0.02)
    s["modality_preprocessors.text.pos_embed"] = rnd(1, 77, tw, scale=0.01)
    s["modality_preprocessors.text.mask"] = torch.full((77, 77), float("-inf")).triu(1)
    _blocks(s, g, "text", tw, 1, bias_kv=False)
    s["modality_heads.text.proj.0.weight"] = torch.ones(tw)
    s["modality_heads.text.proj.0.bias"] = torch.zeros(tw)
    s["modality_heads.text.proj.1.weight"] = rnd(embed_dim, tw, scale=tw**-0.5)
    s["modality_postprocessors.text.1.log_logit_scale"] = torch.tensor(math.log(1 / 0.07))
    s["modality_preprocessors.depth.cls_token"] = rnd(1, 1, tw, scale=0.1)
    s["modality_preprocessors.depth.depth_stem.proj.weight"] = rnd(tw, 1, 16, 16, scale=0.1)
    s["modality_preprocessors.depth.depth_stem.norm_layer.weight"] = torch.ones(tw)
    s["modality_preprocessors.depth.pos_embedding_helper.pos_embed"] = rnd(1, 197, tw, scale=0.1)
    _blocks(s, g, "depth", tw, 1, bias_kv=True)
    s["modality_heads.depth.2.weight"] = rnd(embed_dim, tw, scale=0.1)
    s["modality_postprocessors.depth.1.log_logit_scale"] = torch.tensor(math.log(5.0))
    s["modality_preprocessors.thermal.rgbt_stem.proj.weight"] = rnd(tw, 1, 16, 16, scale=0.1)
    s["modality_trunks.thermal.blocks.0.attn.bias_v"] = rnd(1, 1, tw, scale=0.1)
    s["modality_preprocessors.imu.imu_stem.proj.weight"] = rnd(tw, 48, scale=0.1)
    s["modality_heads.imu.3.weight"] = rnd(embed_dim, tw, scale=0.1)
    return s


def make_imagebind_pth(
    path: str | Path,
    vision_width: int = 32,
    vision_layers: int = 2,
    audio_width: int = 24,
    audio_layers: int = 2,
    embed_dim: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write the state dict as ``torch.save`` of a plain dict (what ``imagebind_huge.pth`` is); returns it."""
    state = imagebind_state(vision_width, vision_layers, audio_width, audio_layers, embed_dim, seed)
    torch.save(state, str(path))
    return state


# ---- the reference ------------------------------------------------------------------------------------
def _ln(x: torch.Tensor, state: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[prefix + "weight"], state[prefix + "bias"], eps)


def _attention(x: torch.Tensor, state: dict, p: str, heads: int, bias_kv: bool) -> torch.Tensor:
    b, n, c = x.shape  # batch first here
    q, k, v = F.linear(x, state[p + "in_proj_weight"], state[p + "in_proj_bias"]).chunk(3, dim=-1)
    if bias_kv:  # one learned key/value row that every query also attends to
        k = torch.cat([k, state[p + "bias_k"].reshape(1, 1, c).expand(b, 1, c)], dim=1)
        v = torch.cat([v, state[p + "bias_v"].reshape(1, 1, c).expand(b, 1, c)], dim=1)
    d = c // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)  # (B, h, N, d)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def _trunk_and_head(x: torch.Tensor, state: dict, modality: str, heads: int, bias_kv: bool) -> torch.Tensor:
    prefix = f"modality_trunks.{modality}.blocks."
    layers = len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    for i in range(layers):
        p = f"{prefix}{i}."
        x = x + _attention(_ln(x, state, p + "norm_1.", 1e-6), state, p + "attn.", heads, bias_kv)
        h = _ln(x, state, p + "norm_2.", 1e-6)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])  # fmt: skip
        x = x + h
    cls = _ln(x, state, f"modality_heads.{modality}.0.", 1e-6)[:, 0]
    return F.normalize(F.linear(cls, state[f"modality_heads.{modality}.2.weight"]), dim=-1)


def reference_vision(state: dict, clips: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 3, 2, 224, 224) CLIP-normalised clips -> (B, E) unit-norm embeddings."""
    w = state[V + "rgbt_stem.proj.1.weight"].float()
    x = F.conv3d(clips, w, stride=tuple(w.shape[2:]))  # (B, W, 1, 16, 16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[V + "cls_token"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + state[V + "pos_embedding_helper.pos_embed"]
    x = _ln(x, state, "modality_trunks.vision.pre_transformer_layer.0.", 1e-6)
    return _trunk_and_head(x, state, "vision", heads, bias_kv=False)


def reference_audio(state: dict, fbank: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 1, 128, 204) normalised fbank -> (B, E) unit-norm embeddings, no logit scale."""
    x = F.conv2d(fbank, state[A + "rgbt_stem.proj.weight"], stride=10)  # (B, W, 12, 19)
    x = x.flatten(2).transpose(1, 2)
    x = _ln(x, state, A + "rgbt_stem.norm_layer.", 1e-5)  # nn.LayerNorm's default eps
    x = torch.cat([state[A + "cls_token"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + state[A + "pos_embedding_helper.pos_embed"]
    return _trunk_and_head(x, state, "audio", heads, bias_kv=True)
