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
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_from_env(device_type: str) -> Group:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if world_size_from_env() <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(parameters, world_size: int) -> None:
    """Replace each gradient by its mean over ranks (one flat all-reduce); a parameter
    without a gradient on every rank keeps None."""
    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
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
    dist.gather_object(state, gathered, dst=0)
    if not group.is_main:
        return
    device = next(p.device for p in model.parameters() if not p.is_meta)
    for rank_state in gathered:
        for index, block_state in rank_state.items():
            model.materialize_block(index, device).load_state_dict(block_state)


def barrier(group: Group) -> None:
    if group.world_size > 1:
        dist.barrier()
