"""Quantize-time clipping search (`geb quantize --clip`): pick each group's range to minimise its error.

The quantizers in geb.infer.quant take a group's (int4) or a row's (int8) range from its min and max, so
one outlier stretches the grid for every other weight of the group. Here each group tries ranges
shrunk by a grid of ratios, quantizes each candidate with the very quantizer that will store it
(BF16-rounded scales included) and keeps the ratio with the least squared reconstruction error.
The chosen range is then applied by clamping the full-precision weight to it: the stored quantizer
reads that clamped group's min and max, so it lands on exactly the grid that was scored. Nothing
about the stored layout or the decode path changes; only which grid each group gets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geb.infer.quant import quantize_int4, quantize_int8, unpack_nibbles

RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5


def _groups(w: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """[N, G, g] view of a weight as the quantizer groups it (int8: one group per row)."""
    n, k = w.shape
    if fmt == "int8":
        return w.reshape(n, 1, k)
    kp = -(-k // group_size) * group_size
    return F.pad(w, (0, kp - k)).reshape(n, kp // group_size, group_size)  # make_linear pads with zeros too


def fake_quant(w: torch.Tensor, fmt: str, group_size: int = 32) -> torch.Tensor:
    """What the stored `fmt` layer holds for weight `w` [N, K], dequantized to FP32 (same shape)."""
    n, k = w.shape
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return q.float() * scale.float()[:, None]
    g = _groups(w.float(), fmt, group_size)
    nib, sz = quantize_int4(g.reshape(n, -1), group_size)
    codes = unpack_nibbles(nib).float().reshape(g.shape)
    sz = sz.float().transpose(0, 1)  # [N, G, 2]
    return ((codes - 8.0) * sz[..., :1] + sz[..., 1:]).reshape(n, -1)[:, :k]


def clip_weight(w: torch.Tensor, fmt: str, group_size: int = 32, col_weight: torch.Tensor | None = None,
                ratios=RATIOS) -> torch.Tensor:
    """`w` clamped per group to the shrunk range whose quantization error is least.

    `col_weight` [K] (optional, >= 0) weights each input column's squared error, e.g. the mean
    squared calibration activation feeding it; without it every column counts the same. Ratio 1.0 is
    always a candidate, so no group ends up worse than plain min/max quantization.
    """
    if fmt not in ("int8", "int4"):
        return w
    n, k = w.shape
    wf = w.float()
    g = _groups(wf, fmt, group_size)
    cw = torch.ones(k) if col_weight is None else col_weight.float().reshape(k)
    cw = _groups(cw.reshape(1, k), fmt, group_size)  # padded columns weigh 0
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = torch.full(g.shape[:2], float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in ratios:
        clo, chi = lo * r, hi * r
        if fmt == "int8":  # symmetric: the row's range is +-amax
            a = torch.maximum(clo.abs(), chi.abs())
            clo, chi = -a, a
        cand = torch.minimum(torch.maximum(g, clo), chi)
        dq = _groups(fake_quant(cand.reshape(n, -1)[:, :k], fmt, group_size), fmt, group_size)
        err = ((dq - g) ** 2 * cw).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better[..., None], clo, best_lo)
        best_hi = torch.where(better[..., None], chi, best_hi)
    out = torch.minimum(torch.maximum(g, best_lo), best_hi).reshape(n, -1)[:, :k]
    return out.to(w.dtype) if w.dtype != torch.float32 else out


def clip_getter(get, fmt: str, group_size: int = 32, head_fmt: str | None = None):
    """Wrap a `get(name)` of full-precision parameters so linear weights come back clip-searched.

    Norm weights pass through; the embedding/head matrix is searched for `head_fmt` (the head's
    format; an int8 embedding uses the same per-row grid, so both gain).
    """
    def wrapped(name):
        w = get(name)
        if not name.endswith(".weight") or w.dim() != 2:
            return w
        if name in ("tok_emb.weight", "lm_head.weight"):
            return clip_weight(w, head_fmt or fmt, group_size)
        return clip_weight(w, fmt, group_size)
    return wrapped
