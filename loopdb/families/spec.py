"""What a model family declares (the fields are described in loopdb.families)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config


def _no_rules(config: Config) -> list:
    return []


BLOCK_PARALLEL_HELP = ("--block-parallel trains the blocks of a stacked DiffusionBlocks model "
                       "(family=stacked, objective=diffusion)")


def _no_block_parallel(config: Config) -> str:
    return BLOCK_PARALLEL_HELP


def _nothing_after_optimizer(model, optimizer, device, distributed: bool) -> None:
    return None


def _some_parameters_idle(config: Config) -> bool:
    return False


def dense_trains_every_parameter(config: Config) -> bool:
    return config.train.objective == "dense"


@dataclass(frozen=True)
class Family:
    build: Callable[[Config], torch.nn.Module]
    objective: Callable[[Config], object]
    feed: Callable[[Config, Path | None], object]
    data_dir: Callable[[str | None, Config], Path | None]
    rules: Callable[[Config], list] = _no_rules
    commands: str = "text"
    block_parallel_refusal: Callable[[Config], str | None] = _no_block_parallel  # None: the run can
    build_for_blocks: Callable | None = None
    objective_for_blocks: Callable | None = None
    after_optimizer: Callable = _nothing_after_optimizer
    trains_every_parameter: Callable[[Config], bool] = _some_parameters_idle
