"""An export-friendly LLaMA/Qwen forward with the KV cache as explicit tensors.

Tracing transformers' Llama through its cache classes is fragile across torch/transformers
versions, so this forward reuses the HF modules and weights (projections with their biases
(Qwen2), per-head q/k norms (Qwen3), norms, MLP, rotary embedding) but writes the cache
concatenation, causal mask and attention out plainly. One graph serves prefill (empty past) and
decode; it takes ``inputs_embeds`` so projected media tokens can be spliced in, and returns the
final hidden states the output projectors need.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class LlamaExplicitCache(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, *past) -> (logits, hidden_states, *present)
    of a LLaMA, Qwen2 or Qwen3 causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        c = model.config
        self.num_layers = c.num_hidden_layers
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_rep = c.num_attention_heads // c.num_key_value_heads

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ):
        bsz, seq, _ = inputs_embeds.shape  # (B, S, H)
        past_len = past[0].shape[2]
        total = past_len + seq
        cos, sin = self.model.rotary_emb(inputs_embeds, position_ids)  # (B, S, hd)
        # query s sits at cache position past_len + s; it sees keys t <= that which are not padding
        q_pos = torch.arange(seq, device=inputs_embeds.device) + past_len  # (S,)
        k_pos = torch.arange(total, device=inputs_embeds.device)  # (T,)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(allowed, 0.0, torch.finfo(inputs_embeds.dtype).min)  # (B, 1, S, T)
        h = inputs_embeds
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(bsz, seq, -1, self.head_dim)  # (B, S, nh, hd)
            k = attn.k_proj(x).view(bsz, seq, -1, self.head_dim)  # (B, S, nkv, hd)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, S, hd), (B, nkv, S, hd)
            v = attn.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, nkv, T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            scores = (
                torch.matmul(q, repeat_kv(k, self.n_rep).transpose(2, 3)) * attn.scaling + mask
            )  # (B, nh, S, T)
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, repeat_kv(v, self.n_rep)).transpose(1, 2).reshape(bsz, seq, -1)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h)
        return (self.lm_head(h), h, *presents)


class LlamaReference(nn.Module):
    """The same contract computed by transformers' own forward with a ``DynamicCache`` (for parity)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        # transformers renamed past_key_values -> cache; use whichever this version takes
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    @torch.no_grad()
    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        if past[0].shape[2] > 0:
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.hf(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=True,
            **{self._cache_kw: cache},
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, out.hidden_states[-1], *presents)
