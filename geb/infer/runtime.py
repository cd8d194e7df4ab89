"""The inference runtime: GEB's forward pass rebuilt for generation on CPUs, with a slot KV cache.

`Runtime` takes the weights of a GEB model (by geb's parameter names, the model in geb/model.py being
the one definition) and holds them fused for inference: one query/key/value matrix and one gate/up
matrix per layer, in any format of geb.infer.quant, built for one of two backends:

- native (default wherever geb's decode core was built, geb.infer.native): `decode` is ONE call into
  the core per step, which runs every layer, the final norm and the head on its own threads;
- torch (no core, or `backend="torch"`): `decode` runs the same step as torch ops layer by layer.
  Attention for a single query is two small batched matmuls over the live part of the cache with
  grouped-query heads viewed as [kv_heads, group, dim], in FP32 (torch's SDPA in BF16 is ~10x slower
  for one query on these CPUs). FP32 products go through numpy's OpenBLAS with torch held to one
  thread (torch's idle OpenMP workers would spin and take the other core from OpenBLAS).

`prefill(ids, cache, slot)` is torch ops for both (big GEMMs, causal SDPA), writing the same FP32
cache the native step reads, and returns the last position's logits. Prefill uses `threads` torch
threads; the native step uses `threads` threads of its own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from geb.config import ModelConfig
from geb.errors import GebError
from geb.infer.quant import INT4_GROUP_SIZE, NUMPY_MAX_ROWS, Embedding, Linear, check_format, make_linear, native_backend
from geb.model import rope_tables

PREFILL_CHUNK = 512


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps large freed temporaries of loading and
    prefill otherwise: ~0.4 GiB for geb-1.3b in int4). A no-op where glibc is not the allocator."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class SlotCache:
    """Static FP32 key/value cache with `slots` independent sequences: [n_layer, slots, n_kv, max_len, D].

    `lengths[s]` is how many positions slot s holds. The batch scheduler keeps live sequences in the
    leading slots (moving the last one into a freed slot), so decode reads a contiguous view.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int):
        if max_len > cfg.max_seq_len:
            max_len = cfg.max_seq_len
        shape = (cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots
        self.decoder = None  # (runtime, geb.infer.native.Decoder) once a native step has run on it

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def swap(self, a: int, b: int) -> None:
        la, lb = self.lengths[a], self.lengths[b]
        ka, va = self.k[:, a, :, :la].clone(), self.v[:, a, :, :la].clone()
        self.k[:, a, :, :lb] = self.k[:, b, :, :lb]
        self.v[:, a, :, :lb] = self.v[:, b, :, :lb]
        self.k[:, b, :, :la] = ka
        self.v[:, b, :, :la] = va
        self.lengths[a], self.lengths[b] = lb, la

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * 4


@dataclass
class Layer:
    attn_norm: torch.Tensor
    wqkv: Linear
    wo: Linear
    ffn_norm: torch.Tensor
    w_gateup: Linear
    w_down: Linear
    qkv_bias: torch.Tensor | None = None  # FP32 [q_dim + 2 kv_dim] (Qwen2-style checkpoints)


class Runtime:
    def __init__(self, cfg: ModelConfig, fmt: str, emb: Embedding, layers: list[Layer], norm: torch.Tensor,
                 head: Linear, info: dict | None = None):
        self.cfg, self.fmt = cfg, check_format(fmt)
        # the native step needs every product on the core (a torch-backend layer cannot be described to it)
        self.native = all(getattr(m, "native", False) for L in layers for m in (L.wqkv, L.wo, L.w_gateup, L.w_down)) \
            and getattr(head, "native", False)
        self.emb, self.layers, self.norm, self.head = emb, layers, norm, head
        self.info = dict(info or {})
        c = cfg
        self.scale = 1.0 / math.sqrt(c.head_dim)
        cos, sin = rope_tables(cfg, c.max_seq_len)
        self.rope_cos, self.rope_sin = cos, sin  # [max_seq_len, rotary_dims / 2], read by the native step
        rd = c.rotary_dims
        # Rotation as x * cos_f + rot(x) * sin_f with rot(x) a permutation: two multiplies, no gathers.
        if c.rope_style == "half":
            self.cos_f = torch.cat([cos, cos], -1)
            self.sin_f = torch.cat([-sin, sin], -1)
        else:
            self.cos_f = cos.repeat_interleave(2, -1)
            self.sin_f = torch.stack([-sin, sin], -1).flatten(-2)
        self.rd = rd
        self.threads = torch.get_num_threads()
        self._torch_threads = None
        trim_heap()  # conversion temporaries of loading
    # -- helpers ------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor by its name in a quantized folder (a tied table appears once, as tok_emb)."""
        sd = dict(self.emb.state("tok_emb."))
        for i, L in enumerate(self.layers):
            p = f"layers.{i}."
            sd[p + "attn_norm.weight"] = L.attn_norm
            sd.update(L.wqkv.state(p + "attn.wqkv."))
            if L.qkv_bias is not None:
                sd[p + "attn.wqkv.bias"] = L.qkv_bias
            sd.update(L.wo.state(p + "attn.wo."))
            sd[p + "ffn_norm.weight"] = L.ffn_norm
            sd.update(L.w_gateup.state(p + "ffn.w_gateup."))
            sd.update(L.w_down.state(p + "ffn.w_down."))
        sd["norm.weight"] = self.norm
        if not self.cfg.tie_embeddings:  # a tied table is stored once, as tok_emb (both sides read it)
            sd.update(self.head.state("lm_head."))
        return sd

    @property
    def head_shares_embedding(self) -> bool:
        emb = {t.data_ptr() for t in self.emb.state("").values()}
        return any(t.data_ptr() in emb for t in self.head.state("").values()) if self.head.fmt != "int4" else False

    @property
    def weight_bytes(self) -> int:
        n = self.emb.nbytes + self.norm.numel() * 4
        n += 0 if self.head_shares_embedding else self.head.nbytes
        for L in self.layers:
            n += sum(m.nbytes for m in (L.wqkv, L.wo, L.w_gateup, L.w_down)) + 8 * self.cfg.d_model
        return n

    @property
    def backend(self) -> str:
        return "native" if self.native else "torch"

    def set_threads(self, n: int) -> None:
        self.threads = max(1, int(n))
        self._torch_threads = None
        if self.native:
            from geb.infer import native

            native.set_threads(self.threads)
        try:  # numpy's OpenBLAS pool (FP32 decode); threadpoolctl is optional
            from threadpoolctl import threadpool_limits

            threadpool_limits(self.threads, user_api="blas")
        except Exception:
            pass

    @contextlib.contextmanager
    def threads_scope(self):
        """Run a generation call, then give the process back its torch thread count."""
        before = torch.get_num_threads()
        self._torch_threads = before
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
            self._torch_threads = None

    def _use_threads(self, n: int) -> None:
        if self._torch_threads != n:
            torch.set_num_threads(n)
            self._torch_threads = n

    def _rope(self, x: torch.Tensor, cos_f: torch.Tensor, sin_f: torch.Tensor) -> torch.Tensor:
        """x [M, heads, D] with cos_f/sin_f [M, 1, rd]."""
        rd = self.rd
        xr = x[..., :rd]
        if self.cfg.rope_style == "half":
            rot = torch.roll(xr, rd // 2, -1)
        else:
            rot = xr.unflatten(-1, (rd // 2, 2)).flip(-1).flatten(-2)
        out = xr * cos_f + rot * sin_f
        return out if rd == x.shape[-1] else torch.cat([out, x[..., rd:]], -1)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.norm_eps)

    def _qkv(self, L: Layer, x: torch.Tensor, cos_f, sin_f):
        c = self.cfg
        m = x.shape[0]
        qkv = L.wqkv(self._norm(x, L.attn_norm))
        if L.qkv_bias is not None:
            qkv = qkv + L.qkv_bias
        qkv = qkv.view(m, c.n_head + 2 * c.n_kv_head, c.head_dim)
        qk = self._rope(qkv[:, : c.n_head + c.n_kv_head], cos_f, sin_f)
        return qk[:, : c.n_head], qk[:, c.n_head :], qkv[:, c.n_head + c.n_kv_head :]

    def _ffn(self, L: Layer, x: torch.Tensor) -> torch.Tensor:
        gu = L.w_gateup(self._norm(x, L.ffn_norm))
        g, u = gu.split(self.cfg.ffn_hidden, -1)
        return L.w_down(F.silu(g).mul_(u))

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids, cache: SlotCache, slot: int = 0, all_logits: bool = False,
                chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Append `ids` to slot's sequence; return FP32 logits of the last position [V] (or all [T, V])."""
        ids = torch.as_tensor(ids, dtype=torch.long).view(-1)
        start = cache.lengths[slot]
        if start + ids.numel() > cache.max_len:
            raise GebError(f"sequence of {start + ids.numel()} positions exceeds the cache ({cache.max_len})")
        self._use_threads(self.threads)
        outs = []
        for i in range(0, ids.numel(), chunk):
            h = self._prefill_chunk(ids[i : i + chunk], cache, slot)
            outs.append(h if all_logits else h[-1:])
        x = torch.cat(outs) if all_logits else outs[-1]
        logits = self.head(self._norm(x, self.norm))
        if ids.numel() >= 64:
            trim_heap()
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def prefill_rows(self, rows: list, cache: SlotCache, slots: list[int],
                     positions: list[list[int]]) -> list[torch.Tensor]:
        """Several sequences in one pass (scoring): row i is appended to slot slots[i]; every weight product
        runs once over all rows' tokens, attention per row. Returns, per row, the FP32 logits [P, V] at
        its row-relative `positions[i]`. Rows are not chunked: the caller bounds their total length."""
        segs = [(sl, torch.as_tensor(ids, dtype=torch.long).view(-1)) for sl, ids in zip(slots, rows)]
        for sl, ids in segs:
            if cache.lengths[sl] + ids.numel() > cache.max_len:
                raise GebError(f"sequence of {cache.lengths[sl] + ids.numel()} positions exceeds the cache "
                               f"({cache.max_len})")
        self._use_threads(self.threads)
        x = self._prefill_segments(segs, cache)
        at, off = [], 0
        for (_, ids), pos in zip(segs, positions):
            at.extend(off + p for p in pos)
            off += ids.numel()
        logits = self.head(self._norm(x[at], self.norm))
        if off >= 64:
            trim_heap()
        return list(logits.split([len(p) for p in positions]))

    def _prefill_chunk(self, ids: torch.Tensor, cache: SlotCache, slot: int) -> torch.Tensor:
        return self._prefill_segments([(slot, ids)], cache)

    def _prefill_segments(self, segs: list[tuple[int, torch.Tensor]], cache: SlotCache) -> torch.Tensor:
        """Hidden states [sum T, D] of segments (slot, ids), each appended to its slot's sequence."""
        c = self.cfg
        spans = []  # (slot, start, end, first row in x)
        row = 0
        for slot, ids in segs:
            start = cache.lengths[slot]
            spans.append((slot, start, start + ids.numel(), row))
            row += ids.numel()
        x = self.emb(segs[0][1] if len(segs) == 1 else torch.cat([ids for _, ids in segs]))
        if len(spans) == 1:
            _, start, end, _ = spans[0]
            cos_f, sin_f = self.cos_f[start:end, None], self.sin_f[start:end, None]
        else:
            pos = torch.cat([torch.arange(start, end) for _, start, end, _ in spans])
            cos_f, sin_f = self.cos_f[pos, None], self.sin_f[pos, None]
        masks = [torch.arange(end)[None, :] <= torch.arange(start, end)[:, None] if start else None
                 for _, start, end, _ in spans]
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x, cos_f, sin_f)
            ys = []
            for (slot, start, end, r0), mask in zip(spans, masks):
                t = end - start
                qs, ks, vs = q[r0 : r0 + t], k[r0 : r0 + t], v[r0 : r0 + t]
                kc, vc = cache.k[li, slot], cache.v[li, slot]
                kc[:, start:end] = ks.transpose(0, 1)
                vc[:, start:end] = vs.transpose(0, 1)
                qh = qs.transpose(0, 1)[None]
                if start:
                    y = F.scaled_dot_product_attention(qh, kc[None, :, :end], vc[None, :, :end], attn_mask=mask,
                                                       enable_gqa=True)
                else:
                    y = F.scaled_dot_product_attention(qh, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                                       is_causal=t > 1, enable_gqa=True)
                ys.append(y[0].transpose(0, 1).reshape(t, c.q_dim))
            x = x + L.wo(ys[0] if len(ys) == 1 else torch.cat(ys))
            x = x + self._ffn(L, x)
        for slot, _, end, _ in spans:
            cache.lengths[slot] = end
        return x

    # -- decode -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: SlotCache, positions: list[int] | None = None) -> torch.Tensor:
        """One token for each of slots 0..B-1 (tokens [B]); each goes at its slot's length. → logits [B, V]."""
        b = tokens.numel()
        pos = list(cache.lengths[:b]) if positions is None else list(positions)
        if max(pos) >= cache.max_len:
            raise GebError(f"decode past the cache's capacity ({cache.max_len} positions)")
        if self.native:
            self._use_threads(1)  # torch runs only the caller's small ops (sampling): keep its pool quiet
            if cache.decoder is None or cache.decoder[0] is not self:
                from geb.infer.native import Decoder

                cache.decoder = (self, Decoder(self, cache))
            logits = cache.decoder[1].step(tokens, pos)
        else:
            logits = self._decode_torch(tokens, cache, pos)
        for i, p in enumerate(pos):
            cache.lengths[i] = p + 1
        return logits

    def _decode_torch(self, tokens: torch.Tensor, cache: SlotCache, pos: list[int]) -> torch.Tensor:
        c = self.cfg
        b = tokens.numel()
        numpy_path = self.fmt == "fp32" and b <= NUMPY_MAX_ROWS
        # Only the weight products are worth several torch threads at decode; every other op is tiny,
        # and each op that opens an OpenMP region pays a wake-up (a whole time slice when the machine
        # is busy). So small ops run on one thread and the pool is widened around each product.
        wide = 1 if numpy_path else self.threads
        use = self._use_threads

        def mm(lin, h):
            if wide > 1:
                use(wide)
                out = lin(h)
                use(1)
                return out
            return lin(h)

        use(1)
        kvh, grp, d, nh = c.n_kv_head, c.n_head // c.n_kv_head, c.head_dim, c.n_head
        pos_t = torch.tensor(pos)
        cos_f, sin_f = self.cos_f[pos_t][:, None], self.sin_f[pos_t][:, None]
        s = max(pos) + 1
        bias = None
        if b > 1 and min(pos) + 1 < s:
            late = (torch.arange(s)[None, :] > pos_t[:, None]).view(b, 1, 1, s)
            bias = torch.zeros(b, 1, 1, s).masked_fill_(late, float("-inf"))
        rows = torch.arange(b)
        x = self.emb(tokens.view(-1))
        for li, L in enumerate(self.layers):
            qkv = mm(L.wqkv, self._norm(x, L.attn_norm))
            if L.qkv_bias is not None:
                qkv = qkv + L.qkv_bias
            qkv = qkv.view(b, nh + 2 * kvh, d)
            qk = self._rope(qkv[:, : nh + kvh], cos_f, sin_f)
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + kvh :]
            kc, vc = cache.k[li], cache.v[li]
            if b == 1:
                p = pos[0]
                kc[0, :, p] = k[0]
                vc[0, :, p] = v[0]
                att = torch.matmul(q.view(kvh, grp, d), kc[0, :, :s].transpose(-1, -2))
                att = torch.softmax(att.mul_(self.scale), -1)
                y = torch.matmul(att, vc[0, :, :s]).view(1, c.q_dim)
            else:
                kc[rows, :, pos_t] = k
                vc[rows, :, pos_t] = v
                att = torch.matmul(q.view(b, kvh, grp, d), kc[:b, :, :s].transpose(-1, -2)).mul_(self.scale)
                if bias is not None:
                    att = att + bias
                y = torch.matmul(torch.softmax(att, -1), vc[:b, :, :s]).view(b, c.q_dim)
            x = x + mm(L.wo, y)
            g, u = mm(L.w_gateup, self._norm(x, L.ffn_norm)).split(c.ffn_hidden, -1)
            x = x + mm(L.w_down, F.silu(g).mul_(u))
        return mm(self.head, self._norm(x, self.norm))

    @torch.inference_mode()
    def forward_logits(self, ids) -> torch.Tensor:
        """FP32 logits [T, V] for one sequence (scoring, perplexity); uses a scratch cache."""
        ids = torch.as_tensor(ids, dtype=torch.long).view(-1)
        cache = SlotCache(self.cfg, 1, ids.numel())
        return self.prefill(ids, cache, 0, all_logits=True)


def default_side_formats(fmt: str) -> tuple[str, str]:
    """(embedding format, lm head format) for a block format: 8 bits at most for int4 blocks' neighbours.

    The head is the single largest matrix and the most sensitive to rounding; int8 keeps its error
    near zero for 6% more bytes per token than int4 would. The embedding is a row lookup: int8 halves
    its resident memory against BF16 at no speed cost.
    """
    return {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "int8": ("int8", "int8"),
            "int4": ("int8", "int8")}[fmt]


def build_runtime(cfg: ModelConfig, get, fmt: str, group_size: int = INT4_GROUP_SIZE, release=None,
                  info: dict | None = None, backend: str = "auto") -> Runtime:
    """Build a Runtime from full-precision weights; `get(name)` returns the tensor of a GEB parameter.

    `release(name)` (optional) is called once a source tensor has been converted, so a memory-mapped
    source can drop its pages and peak memory stays near the converted model's size. `backend`:
    'auto' (the native core where it is available), 'native' or 'torch' (geb.infer.quant).
    """
    check_format(fmt)
    native = native_backend(backend)
    release = release or (lambda name: None)
    emb_fmt, head_fmt = default_side_formats(fmt)

    def take(names):
        ws = [get(n) for n in names]
        w = ws[0] if len(ws) == 1 else torch.cat([t.float() for t in ws], 0)
        return w, names

    def lin(names, f=fmt):
        w, ns = take(names)
        out = make_linear(w, f, group_size, native)
        if len(ns) > 1 or not _uses_in_place(out, w):  # the source was copied: drop its pages
            for n in ns:
                release(n)
        return out

    layers = []
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        layers.append(Layer(
            attn_norm=get(p + "attn_norm.weight").float().clone(),
            wqkv=lin([p + "attn.wq.weight", p + "attn.wk.weight", p + "attn.wv.weight"]),
            wo=lin([p + "attn.wo.weight"]),
            ffn_norm=get(p + "ffn_norm.weight").float().clone(),
            w_gateup=lin([p + "ffn.w_gate.weight", p + "ffn.w_up.weight"]),
            w_down=lin([p + "ffn.w_down.weight"]),
            qkv_bias=torch.cat([get(p + f"attn.{n}.bias").float() for n in ("wq", "wk", "wv")]).contiguous()
            if cfg.qkv_bias else None,
        ))
    emb_w = get("tok_emb.weight")
    if cfg.tie_embeddings:
        head = make_linear(emb_w, head_fmt, group_size, native)
        emb = _embedding_sharing(head, emb_w, emb_fmt)
    else:
        emb = Embedding.from_float(emb_w, emb_fmt)
        head = lin(["lm_head.weight"], head_fmt)
    if emb.w.data_ptr() != emb_w.data_ptr():
        release("tok_emb.weight")
    norm = get("norm.weight").float().clone()
    info = {"format": fmt, "group_size": group_size if fmt == "int4" else None, "embedding_format": emb_fmt,
            "head_format": head_fmt, **(info or {})}
    return Runtime(cfg, fmt, emb, layers, norm, head, info)


def _uses_in_place(out, w: torch.Tensor) -> bool:
    return getattr(out, "w", None) is not None and out.w.data_ptr() == w.data_ptr()


def _embedding_sharing(head: Linear, emb_w: torch.Tensor, emb_fmt: str) -> Embedding:
    """A tied table is stored once: the embedding reads the head's tensors when their formats agree."""
    st = head.state("")
    if head.fmt == emb_fmt == "int8":
        return Embedding("int8", st["qweight"], st["scales"])
    if head.fmt == emb_fmt and "weight" in st:
        return Embedding(emb_fmt, st["weight"])
    return Embedding.from_float(emb_w, emb_fmt)


def runtime_from_model(model, fmt: str = "fp32", group_size: int = INT4_GROUP_SIZE, backend: str = "auto") -> Runtime:
    """A Runtime over a live GEB model's weights (FP32 shares nothing fused; the model stays usable)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return build_runtime(model.cfg, lambda n: sd[n], fmt, group_size, info={"source": "model"}, backend=backend)
