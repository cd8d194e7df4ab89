"""The one geb model: decoder-only transformer with RoPE, grouped-query attention, SwiGLU and RMSNorm.

Training, evaluation, inference and every import/export path use this definition. Parameter names
(`tok_emb`, `layers.N.attn.{wq,wk,wv,wo}`, `layers.N.ffn.{w_gate,w_up,w_down}`, `norm`, `lm_head`)
are geb's own; the export modules map them to Megatron, Hugging Face Llama and GGUF names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from geb.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in FP32 whatever the activation dtype: BF16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [length, rotary_dims // 2] in FP32."""
    rd = cfg.rotary_dims
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, rd, 2, device=device, dtype=torch.float64) / rd))
    t = torch.arange(length, device=device, dtype=torch.float64)
    ang = torch.outer(t, inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the leading rotary dims of x [B, H, T, D]; cos/sin are [B or 1, 1, T, R/2]."""
    rd = cos.shape[-1] * 2
    xr, xp = x[..., :rd].float(), x[..., rd:]
    if style == "half":
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # interleaved: pairs (2i, 2i+1)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    out = out.to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


class KVCache:
    """A pre-allocated (static) key/value cache for all layers: [n_layer, B, n_kv, max_len, head_dim].

    `pos` is the number of positions already written (shared by the batch; batched prompts of
    different lengths are left-padded and masked by the caller).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k.to(self.k.dtype)
        self.v[layer, :, :, self.pos : end] = v.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.wq = nn.Linear(cfg.d_model, cfg.q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, attn_mask: torch.Tensor | None):
        b, t, _ = x.shape
        c = self.cfg
        q = self.wq(x).view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, c.rope_style)
        k = apply_rope(k, cos, sin, c.rope_style)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        s = k.shape[2]
        if attn_mask is None and (cache is None or cache.pos == 0):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        else:
            if attn_mask is None:
                attn_mask = causal_mask(t, s, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, c.q_dim))


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """Boolean [t, s] mask for t new queries whose keys are the last t of s positions."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, attn_mask)
        return x + self.ffn(self.ffn_norm(x))


class GEB(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # GLM-130B's embedding gradient shrink (the paper's third anti-spike measure): the forward
        # value is unchanged, the gradient into the embedding table is scaled by alpha. 1.0 = off.
        self.emb_grad_alpha = 1.0
        # RoPE tables are a plain cache, not buffers: they stay FP32 whatever dtype the weights take,
        # and are rebuilt on first use after the model moves device or leaves the meta device.
        self._rope_len = 0
        self.rope_cos = self.rope_sin = torch.empty(0)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    # -- initialisation -------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise all weights; also call after materialising a model built on the meta device."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                s = out_std if name.endswith(("attn.wo.weight", "ffn.w_down.weight")) else std
                if gen is not None and p.device.type == "cpu":
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
                else:
                    nn.init.normal_(p, 0.0, s)
        self.reset_rope()

    def reset_rope(self, length: int | None = None) -> None:
        length = length or self.cfg.max_seq_len
        dev = self.tok_emb.weight.device
        if dev.type == "meta":
            return
        cos, sin = rope_tables(self.cfg, length, device=dev)
        self.rope_cos, self.rope_sin = cos, sin
        self._rope_len = length

    # -- forward --------------------------------------------------------------------------------
    def _rope_for(self, positions: torch.Tensor | None, start: int, t: int):
        if self._rope_len == 0 or self.rope_cos.device != self.tok_emb.weight.device:
            self.reset_rope()
        if positions is None:
            if start + t > self._rope_len:
                raise ValueError(f"sequence of {start + t} positions exceeds max_seq_len {self.cfg.max_seq_len}")
            cos = self.rope_cos[start : start + t][None, None]
            sin = self.rope_sin[start : start + t][None, None]
        else:  # per-row positions [B, T] (left-padded batches, packed documents)
            cos = self.rope_cos[positions][:, None]
            sin = self.rope_sin[positions][:, None]
        return cos, sin

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """ids [B, T] → logits [B, T, V] (or hidden states), or the mean loss when targets are given.

        targets use -100 for positions that carry no loss. attn_mask is a boolean mask broadcastable
        to [B, 1, T, S] (True = attend); positions are per-row RoPE positions [B, T].
        """
        b, t = ids.shape
        start = cache.pos if cache is not None else 0
        x = self.tok_emb(ids)
        a = self.emb_grad_alpha
        if a != 1.0 and torch.is_grad_enabled():
            x = x * a + x.detach() * (1.0 - a)
        cos, sin = self._rope_for(positions, start, t)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.pos += t
        x = self.norm(x)
        if return_hidden:
            return x
        if targets is None:
            return self.lm_head(x)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
