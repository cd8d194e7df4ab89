"""Data-parallel training under torchrun: process groups, DDP or FSDP2, and sharded checkpoints.

`torchrun --nproc-per-node N -m geb pretrain ...` starts N copies of the CLI; `setup()` reads the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL on CUDA, gloo on
CPU) and picks this rank's device. A plain `python -m geb ...` is a world of one and touches nothing.

The global batch is `batch_size * grad_accum` sequences whatever the world size: the loop's micro-batch
indices 0..grad_accum-1 are split into equal contiguous slices, one per rank (`rank_micros`), and each
rank accumulates its slice. Gradients are averaged across ranks, so the update equals the
single-process one up to floating-point summation order.

Checkpoints: every rank writes its shard of the model and optimizer with torch.distributed.checkpoint
(DCP) into `dcp/`, which loads on any number of processes (DCP reshards by parameter name); rank 0
also writes the gathered weights as `model.safetensors` with the rest of an ordinary checkpoint
folder, so every checkpoint loads anywhere without torch.distributed. `consolidate()` rebuilds
`model.safetensors` from `dcp/` alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from geb.checkpoint import CONFIG, META, WEIGHTS, save_checkpoint
from geb.common import atomic_write, check_destination, with_path
from geb.errors import GebError

DCP_DIR = "dcp"


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup(device_name: str = "auto") -> DistEnv:
    """Join the torchrun process group (once per process) and return this rank's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if world <= 1:
        return DistEnv(device=torch.device(("cuda" if want_cuda else "cpu") if device_name == "auto" else device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if not torch.cuda.is_available():
            raise GebError(f"--device {device_name}: CUDA is not available on rank {rank}")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                   local_world=local_world_size(), device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def rank_micros(grad_accum: int, env: DistEnv) -> range:
    """The micro-batch indices of one optimizer step that this rank computes."""
    if grad_accum % env.world:
        raise GebError(f"the global batch is grad_accum={grad_accum} micro-batches, which {env.world} processes "
                       f"cannot share equally; make --grad-accum (or --global-batch / --batch-size) a multiple of "
                       f"{env.world}")
    k = grad_accum // env.world
    return range(env.rank * k, (env.rank + 1) * k)


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.active:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world
    return values


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes (cfg, emb_grad_alpha, ...) to the wrapped GEB, so Tasks can
    treat the model they are given as a GEB whatever the parallel mode."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not registered yet (inside DDP's own __init__)
                raise
            return getattr(self.module, name)


def wrap(model: torch.nn.Module, env: DistEnv, parallel: str) -> torch.nn.Module:
    """Return the module to train: the model itself (one process), DDP, or the model sharded by FSDP2.

    FSDP2 shards each transformer block, then the root (embedding, final norm, output layer), with
    the policy of `fsdp_policy`: parameters, optimizer and reductions stay FP32 and autocast does the
    BF16 casts, so a step computes what it computes under DDP or in one process.
    """
    if parallel not in ("auto", "ddp", "fsdp", "none"):
        raise GebError(f"parallel must be auto, ddp, fsdp or none, got {parallel!r}")
    if not env.active:
        return model
    if parallel in ("auto", "ddp"):
        ids = [env.device.index] if env.device.type == "cuda" else None
        return _DDP(model, device_ids=ids, broadcast_buffers=False)
    if parallel == "none":
        raise GebError("parallel=none cannot run under torchrun with more than one process")
    from torch.distributed.fsdp import fully_shard

    mp = fsdp_policy()
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at the start of backward: keeping them
        # unsharded after forward saves one all-gather.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def fsdp_policy():
    """FSDP2's MixedPrecisionPolicy, for FP32 and BF16 runs alike: none of its casts.

    param_dtype=None: FSDP2 gathers the FP32 master weights and autocast casts them to BF16 for the
    matrix products, exactly as under DDP and in one process. Casting the parameters instead (the
    usual param_dtype=bfloat16) would also round the embedding table and the RMSNorm weights to BF16,
    so the residual stream would start in BF16 and the numerics would depend on the parallel mode.
    The price: the all-gathers carry 4 bytes per parameter instead of 2.
    reduce_dtype=float32: gradients are reduce-scattered (and accumulated across micro-batches) in FP32.
    cast_forward_inputs=False: inputs (the FP32 RoPE tables included) keep their dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=False)


def is_fsdp(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` and return the global gradient norm (FSDP2 shards included)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6: no DTensor-aware split API
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # a DTensor with a pending (partial) reduction across shards
        total = total.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# -- checkpoints ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it assumes a single process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def full_weights(module: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The complete FP32 weights on CPU on rank 0 (None elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.main:
        return None
    model = unwrap(module)
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # the tied table is stored once, as tok_emb.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_training_checkpoint(folder: str | Path, module, opt, env: DistEnv, tokenizer, meta: dict,
                             train_state: dict, extra_files: dict[str, str]) -> Path:
    """Write a resumable checkpoint folder; every rank must call it.

    Rank 0 first writes a complete ordinary folder (gathered weights, config, tokenizer, meta, loop
    state) under a staging name, every rank then adds its DCP shard to it, and rank 0 swaps it in by
    rename: a crash at any point leaves the previous checkpoint in place.
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    stage = folder.with_name(f".{folder.name}.stage")
    weights = full_weights(module, env) if env.active else None
    try:
        if env.main:
            check_destination(folder, "model")  # never replace a folder geb did not write
            if stage.exists():
                shutil.rmtree(stage)
            save_checkpoint(stage, unwrap(module), tokenizer, meta, train_state=train_state, state_dict=weights,
                            extra_files=extra_files)
        barrier(env)
        msd, osd = get_state_dict(module, opt)
        with _quiet_dcp():
            dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(stage / DCP_DIR))
        barrier(env)
    except BaseException as e:
        if env.main:  # the previous checkpoint stays; the half-written stage goes
            shutil.rmtree(stage, ignore_errors=True)
        os_err = e if isinstance(e, OSError) else _os_error_in(e)
        if os_err is not None:
            raise with_path(os_err, folder, stage) from None
        raise
    if env.main:
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return folder


def _dcp_reason(e: BaseException) -> str:
    """One line for a DCP failure: the first rank's own error, not CheckpointException's rank list."""
    failures = getattr(e, "failures", None) or {}
    for v in failures.values():
        e = v[0] if isinstance(v, tuple) else v
        break
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind DCP's CheckpointException (it wraps each rank's failure), if any."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen or x is None:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        todo += [x.__cause__, x.__context__]
        for v in (getattr(x, "failures", None) or {}).values():
            todo.append(v[0] if isinstance(v, tuple) else v)
    return None


def recover_folder(folder: str | Path) -> None:
    """Finish a swap that a crash interrupted between its two renames (the folder is then missing)."""
    folder = Path(folder)
    stage = folder.with_name(f".{folder.name}.stage")
    if not (folder / META).exists() and (stage / META).exists() and (stage / DCP_DIR / ".metadata").exists():
        try:  # every rank may get here at once: the first rename wins, the others find it done
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(stage, folder)
        except OSError:
            if not (folder / META).exists():
                raise


def has_sharded_state(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file()


def load_training_state(folder: str | Path, module, opt) -> None:
    """Load model and optimizer from `folder/dcp` into this rank's (possibly sharded) module and
    optimizer; works for any number of processes, including one without a process group."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(module, opt)  # also materialises the optimizer's state tensors to load into
    state = {"model": msd, "optim": osd}
    try:
        with _quiet_dcp():
            dcp_load(state, checkpoint_id=str(Path(folder) / DCP_DIR))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise GebError(f"{folder}/{DCP_DIR}: cannot load the sharded training state ({_dcp_reason(e)}); "
                       "a shard may be truncated or corrupt") from None
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """Gather the DCP shards in `folder/dcp` into one `model.safetensors` (one process, no GPU).

    In place by default; with `out`, write a new ordinary checkpoint folder there (weights, config,
    tokenizer, meta; no training state) atomically, and return its path.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import load as dcp_load

    from geb.common import AtomicFolder
    from geb.config import ModelConfig
    from geb.model import GEB

    folder = Path(folder)
    if not has_sharded_state(folder):
        raise GebError(f"{folder}: no sharded checkpoint ({DCP_DIR}/.metadata missing)")
    model = GEB(ModelConfig.load(folder / CONFIG))
    sd = dict(model.state_dict())
    try:
        with _quiet_dcp():
            dcp_load({"model": sd}, checkpoint_id=str(folder / DCP_DIR))
    except (Exception, CheckpointException) as e:
        raise GebError(f"{folder}/{DCP_DIR}: cannot read the model shards ({_dcp_reason(e)})") from None
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if out is None:
        return atomic_write(folder / WEIGHTS, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    out = Path(out)
    with AtomicFolder(out, kind="model") as tmp:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for f in folder.iterdir():
            if f.is_file() and f.suffix == ".json" and f.name != "metrics.jsonl":
                shutil.copy2(f, tmp / f.name)
    return out


__all__ = ["DistEnv", "setup", "shutdown", "barrier", "rank_micros", "all_reduce_mean", "wrap", "unwrap",
           "grad_sync", "clip_grad_norm", "fsdp_policy", "save_training_checkpoint", "load_training_state", "consolidate",
           "recover_folder", "has_sharded_state", "launched_by_torchrun", "local_world_size", "DCP_DIR"]
