"""Model folders for inference: memory-mapped safetensors, quantized folders, and `geb quantize`.

A quantized folder is a checkpoint folder whose `model.safetensors` holds the runtime's own fused
tensors (`layers.N.attn.wqkv.*`, `layers.N.ffn.w_gateup.*`: the rows of wq|wk|wv and w_gate|w_up
stacked in that order) and whose `config.json` carries a `quantization` field:
`{"format", "group_size", "embedding_format", "head_format", "layout": "geb-fused-v1"}`.
`geb.checkpoint.load_model` refuses such folders (training needs full precision); the engine loads both
kinds. Tensors are read through a private memory map: FP32, BF16 and int8 weights are used in place
(no copy, pages shared with the OS cache), int4 nibbles are repacked into torch's kernel layout.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from geb.checkpoint import CONFIG, META, WEIGHTS, check_folder, read_meta
from geb.common import AtomicFolder, now_iso
from geb.config import QUANTIZATION, ModelConfig
from geb.errors import GebError
from geb.infer.quant import FORMATS, INT4_GROUP_SIZE, INT4_GROUPS, Embedding, check_format, linear_from_state, native_backend
from geb.infer.runtime import Layer, Runtime, build_runtime, default_side_formats

LAYOUT = "geb-fused-v1"
ALIGN = 64  # bytes; quantized folders place every tensor on such a boundary
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8,
           "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


class SafeTensorsMap:
    """Zero-copy reader of one safetensors file; every offset is checked against the file's size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
            size = self.path.stat().st_size
            if size < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in a file of {size} bytes")
            header = json.loads(self._f.read(n))
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise GebError(f"{self.path}: cannot read weights ({e}); the file may be truncated or corrupt") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self.entries = header
        for name, e in header.items():
            b, end = e["data_offsets"]
            if self.base + end > size:
                raise GebError(f"{self.path}: tensor '{name}' ends at byte {self.base + end} but the file has "
                               f"{size} bytes (truncated?)")
            if e["dtype"] not in _DTYPES:
                raise GebError(f"{self.path}: tensor '{name}' has unsupported dtype {e['dtype']}")

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str, dtype: torch.dtype | None = None, shape: tuple | None = None) -> torch.Tensor:
        e = self.entries.get(name)
        if e is None:
            raise GebError(f"{self.path}: missing tensor '{name}'")
        dt = _DTYPES[e["dtype"]]
        if dtype is not None and dt != dtype:
            raise GebError(f"{self.path}: tensor '{name}' is {e['dtype']}, expected {dtype}")
        if shape is not None and tuple(e["shape"]) != tuple(shape):
            raise GebError(f"{self.path}: tensor '{name}' has shape {tuple(e['shape'])}, expected {tuple(shape)}")
        b, end = e["data_offsets"]
        count = (end - b) // torch.empty(0, dtype=dt).element_size()
        if count == 0:
            return torch.empty(e["shape"], dtype=dt)
        t = torch.frombuffer(self._mm, dtype=dt, count=count, offset=self.base + b).view(e["shape"])
        # torch's packed int8/int4 kernels fault on unaligned weights: copy the rare unaligned tensor
        return t if (self.base + b) % ALIGN == 0 else t.clone()

    def release(self, name: str) -> None:
        """Drop the pages of a tensor that has been converted (reread from the file if touched again)."""
        e = self.entries.get(name)
        if e is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        b, end = (self.base + o for o in e["data_offsets"])
        page = mmap.PAGESIZE
        start = -(-b // page) * page
        stop = end // page * page
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


class Lazy:
    """A tensor made only when written (dtype, shape, make()), so huge files stream tensor by tensor."""

    def __init__(self, dtype: torch.dtype, shape: tuple, make):
        self.dtype, self.shape, self.make = dtype, tuple(shape), make

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()


def write_aligned_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A standard safetensors file whose tensors all start on ALIGN-byte boundaries where sizes allow.

    The format forbids holes between tensors, so alignment comes from order (tensors whose size is a
    multiple of ALIGN first, largest first) and from padding the JSON header with spaces. Values are
    tensors or `Lazy` (made one at a time while writing).
    """
    rev = {v: k for k, v in _DTYPES.items()}
    items = sorted(tensors.items(), key=lambda kv: (_nbytes(kv[1]) % ALIGN != 0, -_nbytes(kv[1]), kv[0]))
    header, off = {"__metadata__": metadata}, 0
    for name, t in items:
        n = _nbytes(t)
        header[name] = {"dtype": rev[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in items:
            if isinstance(t, Lazy):
                t = t.make().to(t.dtype)
            if tuple(t.shape) != tuple(header[name]["shape"]):
                raise GebError(f"{path}: tensor '{name}' changed shape while writing")
            if t.numel():
                f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def read_config(folder: Path) -> tuple[ModelConfig, dict | None]:
    """(config, its `quantization` field or None): checked by _check_quantization when the folder loads."""
    return ModelConfig.load_with_quantization(folder / CONFIG)


def _check_quantization(q, path: Path) -> dict:
    if not isinstance(q, dict):
        raise GebError(f"{path}: field '{QUANTIZATION}' must be an object")
    if q.get("layout") != LAYOUT:
        raise GebError(f"{path}: quantization layout {q.get('layout')!r} is not {LAYOUT!r} (written by another geb?)")
    fmt = q.get("format")
    if fmt not in FORMATS:
        raise GebError(f"{path}: quantization format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "int4" and q.get("group_size") not in INT4_GROUPS:
        raise GebError(f"{path}: int4 group_size {q.get('group_size')!r} is not one of {INT4_GROUPS}")
    for side in ("embedding_format", "head_format"):
        if q.get(side) not in FORMATS:
            raise GebError(f"{path}: quantization field '{side}' must be one of {', '.join(FORMATS)}")
    return q


def runtime_from_quantized(folder: Path, cfg: ModelConfig, q: dict, backend: str = "auto") -> Runtime:
    q = _check_quantization(q, folder / CONFIG)
    native = native_backend(backend)
    st = SafeTensorsMap(folder / WEIGHTS)
    fmt, gs = q["format"], q.get("group_size") or INT4_GROUP_SIZE
    c = cfg
    used: set[str] = set()

    def get(name, dtype, shape):
        used.add(name)
        return st.get(name, dtype, shape)

    def lin(prefix, shape, f=fmt):
        out = linear_from_state(get, prefix, f, shape, gs, keep_nibbles=False, native=native)
        if f == "int4":  # repacked (int4 nibbles, BF16 weights): the file's pages are no longer needed
            st.release(prefix + "qweight")
            if getattr(out, "copies_scales", False):  # the native layout holds its own scales too
                st.release(prefix + "scales_zeros")
        elif f == "bf16" and getattr(out, "packed", None) is not None:
            st.release(prefix + "weight")
        return out

    d, qkv_rows = c.d_model, c.q_dim + 2 * c.kv_dim
    layers = []
    for i in range(c.n_layer):
        p = f"layers.{i}."
        layers.append(Layer(
            attn_norm=get(p + "attn_norm.weight", torch.float32, (d,)),
            wqkv=lin(p + "attn.wqkv.", (qkv_rows, d)),
            wo=lin(p + "attn.wo.", (d, c.q_dim)),
            ffn_norm=get(p + "ffn_norm.weight", torch.float32, (d,)),
            w_gateup=lin(p + "ffn.w_gateup.", (2 * c.ffn_hidden, d)),
            w_down=lin(p + "ffn.w_down.", (d, c.ffn_hidden)),
            qkv_bias=get(p + "attn.wqkv.bias", torch.float32, (qkv_rows,)) if c.qkv_bias else None,
        ))
    ef, hf = q["embedding_format"], q["head_format"]
    if ef == "int8":
        emb = Embedding("int8", get("tok_emb.qweight", torch.int8, (c.vocab_size, d)),
                        get("tok_emb.scales", torch.bfloat16, (c.vocab_size,)))
    elif ef in ("fp32", "bf16"):
        emb = Embedding(ef, get("tok_emb.weight", torch.float32 if ef == "fp32" else torch.bfloat16, (c.vocab_size, d)))
    else:
        raise GebError(f"{folder / CONFIG}: embedding_format {ef!r} is not supported (fp32, bf16, int8)")
    head_prefix = "tok_emb." if c.tie_embeddings else "lm_head."
    head = lin(head_prefix, (c.vocab_size, d), hf)
    norm = get("norm.weight", torch.float32, (d,))
    extra = sorted(set(st.names()) - used)
    if extra:
        raise GebError(f"{folder / WEIGHTS}: unexpected tensor(s) {', '.join(extra[:5])} for this config "
                       "(weights and config.json do not belong together)")
    return Runtime(cfg, fmt, emb, layers, norm, head, {**q, "source": str(folder)})


def _check_full_names(st: SafeTensorsMap, cfg: ModelConfig) -> None:
    from geb.checkpoint import check_state_dict
    from geb.model import GEB

    with torch.device("meta"):
        model = GEB(cfg)
    fake = {n: torch.empty(st.entries[n]["shape"], device="meta") for n in st.names()}
    check_state_dict(fake, model, str(st.path))


def load_runtime(folder: str | Path, fmt: str | None = None, group_size: int = INT4_GROUP_SIZE, backend: str = "auto",
                 clip: bool = False):
    """(Runtime, Tokenizer, meta) from a full-precision or a quantized model folder.

    A full folder is converted to `fmt` (default fp32) as it loads; a quantized folder runs in its
    own format (asking for another one is an error: precision cannot be recovered). `backend`: see
    geb.infer.runtime.build_runtime. `clip`: convert with the per-group clipping search
    (geb.infer.clip; int8/int4 only, the stored layout is the same).
    """
    from geb.tokenizer import Tokenizer

    folder = check_folder(folder)
    cfg, q = read_config(folder)
    if q:
        stored = q.get("format") if isinstance(q, dict) else None
        if fmt is not None and fmt != stored:
            raise GebError(f"{folder}: a {stored} quantized folder cannot run as {fmt} "
                           f"(quantize the full-precision model to {fmt} instead)")
        rt = runtime_from_quantized(folder, cfg, q, backend)
    else:
        fmt = check_format(fmt or "fp32")
        st = SafeTensorsMap(folder / WEIGHTS)
        _check_full_names(st, cfg)
        # FP32 weights stored FP32 are used in place; fused or converted ones drop the file's pages.
        get = st.get
        if clip:
            from geb.infer.clip import clip_getter

            get = clip_getter(st.get, fmt, group_size, default_side_formats(fmt)[1])
        rt = build_runtime(cfg, get, fmt, group_size, release=st.release, info={"source": str(folder)},
                           backend=backend)
    tok = Tokenizer.load(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise GebError(f"{folder}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size} (tokenizer and weights do not belong together)")
    return rt, tok, read_meta(folder)


def save_quantized(out: str | Path, rt: Runtime, tokenizer, meta: dict) -> Path:
    """Write a quantized folder atomically (weights, config with `quantization`, tokenizer, meta)."""
    from geb import __version__

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    q = {"format": rt.fmt, "group_size": rt.info.get("group_size"), "layout": LAYOUT,
         "embedding_format": rt.info.get("embedding_format", default_side_formats(rt.fmt)[0]),
         "head_format": rt.info.get("head_format", default_side_formats(rt.fmt)[1])}
    sd = {k: v.contiguous() for k, v in rt.state().items()}
    with AtomicFolder(out, kind="model") as tmp:
        write_aligned_safetensors(tmp / WEIGHTS, sd, {"format": "pt", "geb_quantization": rt.fmt})
        rt.cfg.save(tmp / CONFIG, quantization=q)
        tokenizer.save(tmp)
        meta = {"geb_version": __version__, "created": now_iso(), "stage": "quantize", **meta,
                "quantization": q, "weight_bytes": rt.weight_bytes}
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    return out


def quantize_folder(src: str | Path, out: str | Path, fmt: str, group_size: int = INT4_GROUP_SIZE,
                    clip: bool = False) -> Path:
    """`geb quantize`: convert a full-precision model folder into a quantized one (`clip`: see load_runtime)."""
    src = check_folder(src)
    if fmt not in ("bf16", "int8", "int4"):
        raise GebError(f"quantize format must be bf16, int8 or int4, got '{fmt}'")
    if fmt == "int4" and group_size not in INT4_GROUPS:
        raise GebError(f"--group-size must be one of {INT4_GROUPS} (torch's int4 kernel), got {group_size}")
    _, q = read_config(src)
    if q:
        raise GebError(f"{src}: already quantized ({q.get('format') if isinstance(q, dict) else q}); "
                       "quantize the full-precision model instead")
    if Path(out).resolve() == src.resolve():
        raise GebError(f"--out must differ from --model ({src})")
    rt, tok, parent_meta = load_runtime(src, fmt, group_size, clip=clip)
    meta = {"parent": str(src), "parent_stage": parent_meta.get("stage"),
            "settings": {"format": fmt, "group_size": group_size if fmt == "int4" else None,
                         "clip_search": bool(clip and fmt in ("int8", "int4"))}}
    return save_quantized(out, rt, tok, meta)
