"""PyTorch's own distributed engine for lotus: torchrun's world, the process group, collectives, DDP.

``torchrun --nproc_per_node N -m lotus_deploy compress RECIPE`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables) in their environment; this module
reads them, starts the process group (NCCL between GPUs, gloo between CPU processes) and offers the
few collectives the stages need. Without those variables (or with ``WORLD_SIZE=1``) nothing is
started and every function here is the identity of a one-process world, so a plain ``lotus
compress`` behaves exactly as before.

The rules the rest of lotus follows:

* every rank runs every training and measuring stage on identical weights and masks (DDP keeps
  the weights identical; masks are computed from identical inputs, or computed once and
  broadcast: :func:`main_computes`), and :func:`same_on_all_ranks` checks it by hash;
* rank 0 alone writes the run directory; the others write into a scratch folder that is removed;
* a rank that fails writes its message into the rendezvous store and leaves; the others' next
  collective fails (or times out after ``LOTUS_DIST_TIMEOUT`` seconds) and :func:`guard` turns that
  into one :class:`PeerError` line naming the rank and its error.

Low level on purpose: imports nothing of lotus but :mod:`lotus_deploy.errors` (torch inside functions).

Tested here with gloo between CPU processes on one machine only. The NCCL path (``device: auto``
-> ``cuda:LOCAL_RANK`` under torchrun) and several nodes are written against PyTorch's API and
**untested on the development machines** (no GPU); ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from lotus_deploy.errors import RunError

T = TypeVar("T")

TIMEOUT_ENV = "LOTUS_DIST_TIMEOUT"
"""Seconds a collective waits for the other ranks before the run stops (default :data:`DEFAULT_TIMEOUT_S`)."""
DEFAULT_TIMEOUT_S = 1800.0
_ERROR_KEY = "lotus/error/"

_solo = 0  # > 0 inside solo(): this rank works alone, collectives are the identity
_created = False  # whether this module started the process group (and so ends it)


class PeerError(RunError):
    """This rank stops because another rank failed or stopped answering (the message says which)."""


@dataclass(frozen=True)
class World:
    """Where this process sits in a torchrun launch (from the environment; 0 / 1 / 0 without one).

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: processes in the launch, all nodes together.
        local_rank: rank on this node (the GPU index under ``device: auto``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env_world() -> World:
    """The launch described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun)."""
    def get(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise RunError(f"environment variable {name}={os.environ[name]!r} is not an integer (set by torchrun)") from None

    w = World(rank=get("RANK", 0), world_size=get("WORLD_SIZE", 1), local_rank=get("LOCAL_RANK", 0))
    if not 0 <= w.rank < max(w.world_size, 1):
        raise RunError(f"RANK={w.rank} is outside WORLD_SIZE={w.world_size}")
    return w


def launched() -> bool:
    """True in a multi-process launch (``WORLD_SIZE`` > 1 in the environment)."""
    return env_world().world_size > 1


def active() -> bool:
    """True when collectives really communicate: a process group of more than one rank, not in :func:`solo`."""
    if _solo:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a launch or inside :func:`solo`)."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Ranks taking part in collectives (1 outside a launch or inside :func:`solo`)."""
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (the one that writes the run directory) and in a one-process run."""
    if _solo:
        return True
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_world().rank == 0


def timeout_s() -> float:
    """Seconds a collective waits for the others (``LOTUS_DIST_TIMEOUT``, default 1800)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise RunError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def device_for(spec: str):
    """The torch device of ``spec`` for this rank: ``auto`` / ``cuda`` are ``cuda:LOCAL_RANK`` under torchrun.

    ``auto`` is the CPU when CUDA is absent; an explicit ``cuda:N`` is kept as written.
    """
    import torch

    w = env_world()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and w.world_size > 1:
        if w.local_rank >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {w.local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", w.local_rank)
    return torch.device(spec)


def init(device) -> bool:
    """Start the process group of a torchrun launch (NCCL for a CUDA device, else gloo).

    Returns:
        True when this call started it (then :func:`destroy` ends it); False outside a launch or
        when a group exists already.
    """
    global _created
    import datetime

    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    _created = True
    return True


def destroy() -> None:
    """End the process group this module started (closing its connections: peers waiting on us fail fast)."""
    global _created
    import torch.distributed as dist

    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


@contextmanager
def session(device) -> Iterator[bool]:
    """Hold the process group of a torchrun launch for the block (nothing outside a launch).

    Yields:
        Whether the block runs distributed.
    """
    started = init(device)
    try:
        yield active()
    finally:
        if started:
            destroy()


@contextmanager
def solo() -> Iterator[None]:
    """Inside the block this rank works alone: :func:`active` is False and collectives are the identity.

    For work only rank 0 does (export, benchmarks) while the others wait at a :func:`barrier`.
    """
    global _solo
    _solo += 1
    try:
        yield
    finally:
        _solo -= 1


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def report_failure(message: str) -> None:
    """Leave this rank's error in the rendezvous store, where :func:`guard` on the other ranks finds it."""
    if not active():
        return
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        _get_default_store().set(f"{_ERROR_KEY}{rank()}", message[:2000])
    except Exception:  # noqa: BLE001 — the store may be gone with a dead peer; the timeout message still comes
        pass


def peer_failures() -> dict[int, str]:
    """rank -> error message of the ranks that reported a failure (:func:`report_failure`)."""
    import torch.distributed as dist

    out: dict[int, str] = {}
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        for r in range(dist.get_world_size()):
            key = f"{_ERROR_KEY}{r}"
            if r != dist.get_rank() and store.check([key]):
                out[r] = store.get(key).decode(errors="replace")
    except Exception:  # noqa: BLE001 — no store (a dead rank 0 hosted it): fall back to the generic message
        pass
    return out


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe", "socket",
        "process group", "processgroup",
    ))


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn a collective that failed (a dead peer, a timeout) into one :class:`PeerError` line.

    The message names the rank that reported an error and its message when one did, else says
    that a peer stopped answering within ``LOTUS_DIST_TIMEOUT`` seconds. Other errors pass.
    """
    if not active():
        yield
        return
    try:
        yield
    except PeerError:
        raise
    except BaseException as e:
        if not _is_collective_failure(e):
            raise
        import time

        me = rank()
        time.sleep(0.5)  # a failing peer writes its message before it closes its connections
        peers = peer_failures()
        if peers:
            r, msg = min(peers.items())
            raise PeerError(f"rank {me} stops: rank {r} failed during {what}: {msg}") from e
        first = " ".join(str(e).split())[:200]
        raise PeerError(
            f"rank {me} stops: another rank died or did not answer within {timeout_s():g} s during {what} "
            f"({type(e).__name__}: {first}); finished stages are kept: rerun with --resume"
        ) from e


def barrier(what: str = "barrier") -> None:
    """Wait until every rank gets here (identity in a one-process world)."""
    if not active():
        return
    import torch.distributed as dist

    with guard(what):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[_comm_device().index])
        else:
            dist.barrier()


def all_reduce_sum(values: Sequence[float], what: str = "all-reduce") -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64; the same list on every rank)."""
    if not active():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())  # (len(values),)
    with guard(what):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_sum_(tensor, what: str = "all-reduce"):
    """Sum ``tensor`` over the ranks in place (through the backend's device when it lives elsewhere)."""
    if not active():
        return tensor
    import torch.distributed as dist

    dev = _comm_device()
    t = tensor if tensor.device == dev else tensor.to(dev)
    with guard(what):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if t is not tensor:
        tensor.copy_(t)
    return tensor


def broadcast_object(obj: T, src: int = 0, what: str = "broadcast") -> T:
    """Rank ``src``'s ``obj`` (picklable; tensors inside on the CPU) on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    with guard(what):
        dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any, what: str = "all-gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    with guard(what):
        dist.all_gather_object(out, obj)
    return out


def shard(jobs: Sequence[T]) -> list[T]:
    """This rank's jobs: ``jobs[rank::world_size]`` (every job on exactly one rank, no padding)."""
    return list(jobs[rank()::world_size()])


def shard_indices(n: int) -> range:
    """This rank's indices of ``range(n)``, strided: each index on exactly one rank, none repeated."""
    return range(rank(), n, world_size())


def tensors_hash(tensors: Mapping[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a tensor dict (equal dicts, equal hashes)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_on_all_ranks(tensors: Mapping[str, Any], what: str = "hash check") -> bool:
    """Whether every rank holds the same tensors (by :func:`tensors_hash`); True in a one-process world."""
    if not active():
        return True
    return len(set(all_gather_object(tensors_hash(tensors), what=what))) == 1


def broadcast_tensors_(tensors: Mapping[str, Any], src: int = 0, what: str = "broadcast") -> None:
    """Overwrite every rank's tensors with rank ``src``'s, in place (same names and shapes everywhere)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    dev = _comm_device()
    with guard(what):
        for k in sorted(tensors):
            t = tensors[k]
            buf = t.detach() if t.device == dev else t.detach().to(dev)
            if buf.dtype == torch.bool:
                buf = buf.to(torch.uint8)
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.detach().copy_(buf)


def broadcast_module_(model, src: int = 0, what: str = "broadcast of the model") -> None:
    """Give every rank rank ``src``'s parameters and buffers, in place."""
    broadcast_tensors_(dict(model.state_dict(keep_vars=True)), src=src, what=what)


def main_computes(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0 alone (inside :func:`solo`), its result broadcast to every rank.

    For work that need not come out the same twice (a time-budgeted search); ``fn`` must not
    change shared state the others need, or the caller broadcasts that too. An error on rank 0
    stops every rank.
    """
    if not active():
        return fn()
    out, err = None, None
    if is_main():
        try:
            with solo():
                out = fn()
        except BaseException as e:  # sent to the others, raised here below
            err = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            box = broadcast_object((None, err), what=what)
            raise
    box = broadcast_object((out, err), what=what)
    if box[1] is not None:
        raise PeerError(f"rank {rank()} stops: rank 0 failed during {what}: {box[1]}")
    return box[0]


class _Forward:
    """Builds an nn.Module whose forward is ``fn(*args)`` over ``model``'s parameters (for DDP)."""

    @staticmethod
    def wrap(model, fn):
        from torch import nn

        class Forward(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return fn(*args)

        return Forward()


def wrap_ddp(model, device, forward: Callable | None = None, find_unused: bool = False):
    """``model`` (or ``forward`` over it) under DistributedDataParallel; None outside a distributed run.

    Args:
        forward: a custom forward (``(x, extra) -> logits``, e.g. token dropping) that uses the
            model's parameters: it becomes the forward of a wrapper module holding the model, so
            DDP still sees every parameter it touches.
        find_unused: let some trainable parameters go without a gradient in a step (DDP then
            walks the autograd graph every step); by default every parameter that requires
            grad must take part in the loss, or DDP stops at the next step with its own message.

    Returns:
        The DDP module to call in place of the model (gradients averaged over the ranks in
        ``backward``), or None when not distributed.
    """
    if not active():
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = model if forward is None else _Forward.wrap(model, forward)
    with guard("wrapping the model in DDP"):
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
