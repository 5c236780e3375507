"""The family registry: everything the trainer, the run folder and the CLI need to know
about a model family, declared by the family (torchtitan's ModelSpec), so that none of
them names one.

``config.model.family`` names one entry of FAMILIES. A Family gives
  build(config) -> the model, an nn.Module whose settings (e.g. ``loop``, ``blockwise``) say which
      sampler of loopdb.sampling reads it at inference;
  objective(config) -> the loss that trains it
      (``objective.loss(model, batch, generator, step) -> (loss, stats)``);
  feed(config, data_dir) -> its data side for the trainer (a "feed", not to be confused with a
      reasoning task or an lm-eval task): ``batch(generator, device)``, ``evaluate(model, device,
      autocast)`` and ``sample_text(model, step)``. Building the feed may fill config fields taken
      from the data (the vocabulary size), so it runs first;
  data_dir(data, config) -> what ``loopdb train --data`` resolves to (text families: a
      prepared corpus, the default one prepared on first use; image families: the --data
      path, or None for the embedded digits);
  rules(config) -> the family's own (ok, message) checks, on top of Config.validate's;
  commands: which of the CLI's score/sample command sets reads its runs
      ("text", "masked" or "images");
  hooks the trainer calls without naming the family:
      build_for_blocks(config, blocks) -> the model holding only ``blocks`` (one process of
          a block-parallel run), or None when the family has no block-parallel training;
      objective_for_blocks(config, blocks) -> the loss of that process (it trains ``blocks`` only);
      after_optimizer(model, optimizer, device, distributed): e.g. host offload (``distributed``:
          several processes hold the parameters, through DDP, FSDP or block-parallel);
      trains_every_parameter(config) -> True if every trainable parameter gets a gradient at
          every step (DDP then skips its search for unused ones); False is always safe.
Block-parallel models also answer ``shared_parameters()`` (the gradients averaged over
ranks), ``block_parameters(index)`` and ``materialize_block(index, device)`` (assembly).
"""

from __future__ import annotations

import torch

from ..config import FAMILY_NAMES, Config
from ..errors import ConfigError
from .images import DIT, VIT
from .spec import Family
from .text import LOOPED, MASKED, STACKED


FAMILIES: dict[str, Family] = {"looped": LOOPED, "stacked": STACKED, "mdm": MASKED, "vit": VIT, "dit": DIT}
assert tuple(FAMILIES) == FAMILY_NAMES, "config.FAMILY_NAMES and the registry must list the same families"


def family_of(config: Config) -> Family:
    return FAMILIES[config.model.family]


def check_config(config: Config) -> Config:
    """Config.validate (the shared rules), then the family's own; returns the config."""
    config.validate()
    for ok, message in family_of(config).rules(config):
        if not ok:
            raise ConfigError(message)
    return config


def build_model(config: Config) -> torch.nn.Module:
    return family_of(check_config(config)).build(config)
