"""Data parallelism under ``torchrun``: which rows are this process's, and sums over every process.

Every process holds the same global batches (same pairs, same seed) and works on its own contiguous shard of
each one. A mean in the loss over the global batch is ``global_sum(local sum) / global_sum(local count)``, so
the loss is the one-process loss, the same number in every process; each process's gradient is its own rows'
part of that loss's gradient, and their sum (``sum_gradients``) is the one-process gradient::

    L = f(S_1 … S_k),  S_i = Σ_r s_i,r   ⇒   ∂L/∂θ = Σ_r Σ_i ∂f/∂S_i · ∂s_i,r/∂θ   (r: process)

Without a process group (a plain ``python`` or ``interp-steer`` run, or ``torchrun`` with one process) ``World``
is rank 0 of 1 and the training loop takes none of these paths: its numbers are those of a single process.

Below the collectives: the checks ``train`` makes before the first step (every process has the same pairs,
config and starting adapters; no process gets an empty shard) and the gathering of the reference states.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import TrainConfig
from ..method.data import Batch
from ..method.states import Reference


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes (rank 0 of 1 without a process group)."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this rank's share of ``n`` items: contiguous, sizes differing by at most one."""
        q, r = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)


def current() -> World:
    """The default process group's rank and size, or rank 0 of 1 if there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


@contextmanager
def joined() -> Iterator[World]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), join the process group for the block and
    leave it after: nccl when CUDA is available (one GPU a process, by ``LOCAL_RANK``), gloo otherwise. Outside
    torchrun, or if a group already exists, nothing is done.

    >>> with joined() as world: train(...)  # doctest: +SKIP
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise RuntimeError("torchrun started several processes, but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")  # rank, size and rendezvous from torchrun's variables
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def process_device(device: str, world: World) -> str:
    """The device this process's model goes on: under torchrun with CUDA (nccl), ``cuda:LOCAL_RANK``, one GPU
    a process; otherwise ``device`` as given. A CPU model cannot join an nccl group: refused by name."""
    if not (world.parallel and dist.get_backend() == "nccl"):
        return device
    if device not in ("auto", "cuda"):
        raise ValueError(f"under torchrun with CUDA the processes all-reduce with nccl on their GPUs; --device "
                         f"{device} cannot join them (use --device auto/cuda, or hide the GPUs with "
                         "CUDA_VISIBLE_DEVICES= to train on CPUs with gloo)")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def single_process_only(command: str) -> None:
    """Refuse ``command`` under torchrun with several processes: only training is data-parallel, and N copies
    of any other command would write the same files at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"`{command}` runs in one process; only `train` runs under torchrun with several "
                         "processes")


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors, gloo is used here with CPU tensors: collectives run on the group's device
    # whatever device the model is on, and the result goes back to the caller's device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: Tensor, op: Any = None) -> Tensor:
    """A reduced copy of ``t`` (sum, or ``op``), on ``t``'s device; ``t`` itself is left alone."""
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op)
    return buf.to(t.device)


def global_sum(x: Tensor) -> Tensor:
    """Σ of ``x`` over every process, as a value; its gradient reaches this process's own ``x`` only.

    Every process gets the same value (so a loss built from these sums is one number everywhere) and keeps
    only its own rows' part of the gradient; ``sum_gradients`` adds the parts. torch.distributed.nn's
    differentiable all_reduce would all-reduce again in backward, with an order left to the autograd engine;
    here every collective runs in forward, in program order, and a process that has no rows of a batch needs
    no backward through it.
    """
    return _all_reduce(x) + (x - x.detach())  # + exactly 0: the value is the sum itself, bit for bit


def sum_gradients(params: Iterable[nn.Parameter]) -> None:
    """``p.grad ← Σ over processes p.grad`` (a missing grad counts as zeros), one collective for all of them."""
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _all_reduce(torch.cat([g.flatten() for g in grads]))
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).to(p.dtype)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true in any process (e.g. a Ctrl-C that reached one of them)."""
    return bool(_all_reduce(torch.tensor([int(flag)]), dist.ReduceOp.MAX).item())


def same_everywhere(x: Tensor) -> bool:
    """True if ``x`` is bit for bit the same in every process (its max and min over processes agree)."""
    x = x.detach().double().flatten()
    return torch.equal(_all_reduce(x, dist.ReduceOp.MAX), _all_reduce(x, dist.ReduceOp.MIN))


def barrier() -> None:
    dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process (small Python values, e.g. texts)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def columns(attention_mask: Tensor) -> slice:
    """The columns holding a real token in some row (padding shared by every row of a shard is dropped)."""
    real = attention_mask.bool().any(0).nonzero()[:, 0]
    return slice(int(real[0]), int(real[-1]) + 1)


def take_rows(batch: Batch, lo: int, hi: int) -> tuple[Batch, slice]:
    """Rows ``lo:hi`` of ``batch`` without their all-padding columns, and the column slice kept.

    Positions count real tokens only (``Batch.position_ids``), so each kept row computes what it did in the
    whole batch.
    """
    mask = batch.attention_mask[lo:hi]
    cols = columns(mask)
    return Batch(batch.input_ids[lo:hi, cols], mask[:, cols], batch.last[lo:hi] - cols.start), cols


def pair_shard(batch: Batch, world: World) -> Batch:
    """This rank's share of a batch of interleaved pairs (whole pairs: rows 2·lo … 2·hi − 1)."""
    lo, hi = world.bounds(len(batch) // 2)
    return take_rows(batch, 2 * lo, 2 * hi)[0]


def all_rows(local: Sequence[Tensor], sizes: Sequence[int], world: World, pairs: bool = True) -> list[Tensor]:
    """Every process's rows of each batch, in the global order, from this process's ``local[j]`` (its shard of
    batch ``j``, which has ``sizes[j]`` pairs, or rows with ``pairs=False``).

    One collective: each process writes its rows into zeros and the copies are summed, which is exact.
    """
    per = 2 if pairs else 1
    width = local[0].shape[1:]
    full = local[0].new_zeros((per * sum(sizes), *width))
    start = 0
    for x, n in zip(local, sizes):
        lo, hi = world.bounds(n)
        full[start + per * lo: start + per * hi] = x
        start += per * n
    full = _all_reduce(full)
    return list(full.split([per * n for n in sizes]))


# ----------------------------------------------------------------- what train() checks and shares across processes

def check_shards(n_pairs: int, batch_pairs: int, world: World) -> None:
    """Refuse a run in which some process would get no pair of a batch (the global batch is ``batch_pairs``;
    shards may differ by one pair, the loss is over the global batch either way)."""
    last = n_pairs % batch_pairs or batch_pairs
    if min(batch_pairs, last, n_pairs) >= world.size:
        return
    fits = [b for b in range(world.size, n_pairs + 1) if n_pairs % b == 0 or n_pairs % b >= world.size]
    what = (f"batch_pairs {batch_pairs} is less than that" if batch_pairs < world.size else
            f"the last batch of the {n_pairs} training pairs holds {last}")
    best = min(fits, key=lambda b: (b < batch_pairs, abs(b - batch_pairs))) if fits else None  # rather larger
    hint = (f"use --batch-pairs {best} (the global batch, split "
            "over the processes) or change --n-pairs" if fits else "use fewer processes or more pairs")
    raise ValueError(f"{world.size} processes need at least one pair of every batch each, but {what}; {hint}")


def whole_reference(ref: Reference, local: Sequence[Batch], sizes: Sequence[int], world: World) -> Reference:
    """The reference states of every process's rows (global order), from this process's shard ``ref``: what
    ``d_steer``, the loss scale and the baselines need. The per-token log-probs stay with their shard."""
    names = list(ref.extra)
    counts = [len(b) for b in local]
    extra = {n: ref.extra[n].split(counts) for n in names}
    rows = [torch.cat([ref.hs[j], *(extra[n][j] for n in names)], dim=1) for j in range(len(local))]
    full = all_rows(rows, sizes, world)
    widths = [ref.hs[0].shape[1]] + [ref.extra[n].shape[1] for n in names]
    parts = [f.split(widths, dim=1) for f in full]
    return Reference([p[0] for p in parts], [],
                     {n: torch.cat([p[i + 1] for p in parts]) for i, n in enumerate(names)})


def check_same_data(batches: Sequence[Batch], cfg: TrainConfig) -> None:
    """Refuse to train unless every process has the same global batches and config (before any collective
    whose size depends on them)."""
    ids = 0
    for b in batches:  # the token ids, in order (a crc32 is exact in float64)
        ids = zlib.crc32(b.input_ids.contiguous().cpu().numpy().tobytes(), ids)
    crc = zlib.crc32(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    if not same_everywhere(torch.tensor([ids, len(batches), crc], dtype=torch.float64)):
        raise ValueError("the processes disagree on the training pairs or the TrainConfig; start every process "
                         "with the same command and data")


def check_same_start(adapters: nn.ModuleList, d_steer: Tensor, state: list[float], ckpt_path: Path | None) -> None:
    """Refuse to train unless every process starts from the same adapters, direction, step and multipliers."""
    x = torch.cat([*(p.detach().flatten().double().cpu() for p in adapters.parameters()), d_steer.double().cpu(),
                   torch.tensor(state, dtype=torch.float64)])
    if not same_everywhere(x):
        where = f" (did every process read the same {ckpt_path}? one filesystem for all)" if ckpt_path else ""
        raise ValueError(f"the processes disagree on the starting adapters{where}; start every process with the "
                         "same command and data")

