"""Training on several processes, launched by torchrun (gloo on CPU, nccl on GPU).

- data-parallel (any model, ``data_parallel=ddp``): DistributedDataParallel; every rank holds
  the whole model and draws its own micro-batches, the gradients are averaged over ranks,
  so every rank takes the same optimizer step. A parameter that got a gradient on some
  ranks only (a stacked run samples blocks) counts as zero elsewhere.
- fully sharded (``data_parallel=fsdp``, objective dense): FSDP2, each transformer block's
  parameters, gradients and AdamW state split over the ranks, for a model that does not
  fit one device.
- block-parallel (stacked DiffusionBlocks, ``--block-parallel``): rank r owns a contiguous
  share of the blocks: their weights, gradients and optimizer state live on that rank
  only (the other blocks are never allocated there). Only the SHARED parameters'
  gradients are averaged (DDP with the blocks ignored). Every rank draws the same batch at
  a step, so a rank trains its block exactly as a single process training that block
  alone would. Each checkpoint gathers the blocks on rank 0 for the whole model's weights;
  at the end rank 0 also holds the whole model (to evaluate it).

A process that dies or hangs does not leave the others waiting forever: every collective
gives up after the job's timeout (``collective_timeout_minutes``), and the ranks left stop
with ``ProcessLost``.
"""

from __future__ import annotations

import os
import warnings
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


class WholeStep(torch.nn.Module):
    """The model as one module whose forward runs a whole computation: ``wrapper(compute)`` calls
    ``compute()``. The objectives use the model's methods as well as ``model(...)``, and DDP and
    FSDP only see what happens inside their wrapper's forward, so the whole loss runs in it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute):
        return compute()


def data_parallel(model, group: Group, device, ignored: set[str] = frozenset(),
                  every_parameter_used: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``WholeStep(model)``: after backward every gradient is the mean
    over ranks. A parameter that got a gradient on some ranks only (a stacked run samples blocks)
    counts as zero on the others; ``ignored`` (parameter and buffer names of ``model``) are left
    alone (block-parallel: each rank's own blocks). ``every_parameter_used``: every trainable
    parameter gets a gradient at every step, so DDP need not search for unused ones."""
    from torch.nn.parallel import DistributedDataParallel

    wrapper = WholeStep(model)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in ignored])
    with collective("wrapping the model in DistributedDataParallel"):
        return DistributedDataParallel(wrapper, device_ids=[group.local_rank] if device.type == "cuda" else None,
                                       find_unused_parameters=not every_parameter_used,
                                       forward_sync_buffers=False)  # the buffers are constants (rotary tables)


def fully_sharded(model, group: Group, device) -> torch.nn.Module:
    """FSDP2: every transformer block, then the rest of the model, sharded over the ranks; a block's
    weights are gathered while it runs. Build the optimizer after this (it holds the shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..layers import Block

    # FSDP warns of a block returning views (its attention keys and values), in case the caller
    # changes them in place; loopdb never does
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with collective("sharding the model (FSDP)"):
        mesh = init_device_mesh(device.type, (group.world_size,))
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh)
        return fully_shard(WholeStep(model), mesh=mesh)


@contextmanager
def gradient_sync(wrapper, sync: bool):
    """One micro-step's forward and backward; with gradient accumulation the gradients are reduced
    over ranks in the last micro-step's backward only."""
    if wrapper is None:
        yield
        return
    with collective("the training step (gradients averaged over ranks)"):
        if sync:
            yield
        elif hasattr(wrapper, "no_sync"):  # DDP
            with wrapper.no_sync():
                yield
        else:  # FSDP2
            wrapper.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapper.set_requires_gradient_sync(True)


def owned_blocks(num_blocks: int, group: Group) -> tuple[int, ...]:
    """The contiguous share of the blocks that ``group.rank`` trains."""
    if num_blocks % group.world_size:
        raise ValueError(f"--block-parallel needs num_blocks ({num_blocks}) to be a multiple of the number of "
                         f"processes ({group.world_size})")
    share = num_blocks // group.world_size
    return tuple(range(group.rank * share, (group.rank + 1) * share))


def gather_blocks(model, owned: tuple[int, ...], group: Group) -> dict | None:
    """Rank 0 receives every rank's blocks: {block index: state dict of CPU tensors}; None elsewhere."""
    state = {index: {k: v.detach().cpu() for k, v in model.blocks[index].state_dict().items()} for index in owned}
    gathered = [None] * group.world_size if group.is_main else None
    with collective("gathering the blocks"):
        dist.gather_object(state, gathered, dst=0)
    return {index: block for rank_state in gathered for index, block in rank_state.items()} if group.is_main else None


def consolidated_weights(model, group: Group, owned: tuple[int, ...] | None, sharded: bool) -> dict | None:
    """The whole model's weights as CPU tensors on rank 0 (None elsewhere), for the checkpoint that
    `score` and `sample` read. A collective when the weights are split over ranks (FSDP shards,
    block-parallel blocks): every rank calls it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with collective("gathering the shards"):
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if group.is_main else None
    if owned is None:  # data-parallel: every rank holds the same weights
        return {key: value.detach().cpu() for key, value in model.state_dict().items()} if group.is_main else None
    blocks = gather_blocks(model, owned, group)
    if not group.is_main:
        return None
    held = {key: value.detach().cpu() for key, value in model.state_dict().items() if not value.is_meta}
    for index, block in blocks.items():
        held.update({f"blocks.{index}.{key}": value for key, value in block.items()})
    return held


def barrier(group: Group) -> None:
    if group.world_size > 1:
        with collective("waiting for the other processes"):
            dist.barrier()
