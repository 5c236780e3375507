"""Training on several processes, launched by torchrun (gloo on CPU, nccl on GPU).

- data-parallel (any model): every rank holds the whole model and draws its own batches;
  after each backward the gradients are averaged over ranks (all-reduce), so every rank
  takes the same optimizer step, as DistributedDataParallel does. A parameter that got a
  gradient on some ranks only (a stacked run samples blocks) counts as zero elsewhere.
- block-parallel (stacked DiffusionBlocks, ``--block-parallel``): rank r owns a contiguous
  share of the blocks: their weights, gradients and optimizer state live on that rank
  only (the other blocks are never allocated there). Only the SHARED parameters'
  gradients are all-reduced. Every rank draws the same batch at a step, so a rank trains
  its block exactly as a single process training that block alone would. At the end,
  rank 0 gathers the blocks and holds (and saves) the whole model.

A process that dies or hangs does not leave the others waiting forever: every collective
gives up after the job's timeout (``collective_timeout_minutes``), and the ranks left stop
with ``ProcessLost``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import TrainingError


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Group(0, 1, 0)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def init_from_env(device_type: str, timeout_minutes: float = 10.0) -> Group:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    a collective (or the joining itself) waiting longer than ``timeout_minutes`` fails."""
    if world_size_from_env() <= 1:
        return SINGLE
    if not dist.is_initialized():
        with collective("joining the job"):
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def collective(name: str):
    """A collective whose failure means another process died or hung: gloo and nccl report it as a
    plain RuntimeError (connection reset, timeout), turned here into one TrainingError."""
    try:
        yield
    except RuntimeError as error:  # DistStoreError and DistBackendError included
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"rank {rank_from_env()} of {world_size_from_env()}: {name} failed, another process "
                            f"of the job died or hung ({detail[:300]}); the job stops, its checkpoints are intact: "
                            "start it again with --resume") from None


def all_agree(flag: bool, group: Group, device) -> bool:
    """True on every rank if ``flag`` is true on every rank, else False on every rank."""
    if group.world_size == 1:
        return flag
    vote = torch.tensor([float(flag)], device=device)
    with collective("agreeing on the step"):
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())


def average_gradients(parameters, world_size: int) -> None:
    """Replace each gradient by its mean over ranks (one flat all-reduce); a parameter
    without a gradient on every rank keeps None."""
    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    with collective("averaging gradients"):
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
    grads = []
    for parameter, flag in zip(parameters, present.tolist()):
        if flag:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
    if not grads:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    with collective("averaging gradients"):
        dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def owned_blocks(num_blocks: int, group: Group) -> tuple[int, ...]:
    """The contiguous share of the blocks that ``group.rank`` trains."""
    if num_blocks % group.world_size:
        raise ValueError(f"--block-parallel needs num_blocks ({num_blocks}) to be a multiple of the number of "
                         f"processes ({group.world_size})")
    share = num_blocks // group.world_size
    return tuple(range(group.rank * share, (group.rank + 1) * share))


def gather_blocks(model, owned: tuple[int, ...], group: Group) -> None:
    """Rank 0 receives every rank's blocks (CPU copies) and loads them into ``model``."""
    state = {index: {k: v.detach().cpu() for k, v in model.blocks[index].state_dict().items()} for index in owned}
    gathered = [None] * group.world_size if group.is_main else None
    with collective("gathering the blocks"):
        dist.gather_object(state, gathered, dst=0)
    if not group.is_main:
        return
    device = next(p.device for p in model.parameters() if not p.is_meta)
    for rank_state in gathered:
        for index, block_state in rank_state.items():
            model.materialize_block(index, device).load_state_dict(block_state)


def barrier(group: Group) -> None:
    if group.world_size > 1:
        with collective("waiting for the other processes"):
            dist.barrier()
