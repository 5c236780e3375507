"""Model families: what the trainer, checkpoints and CLI need to know about each.

``config.model.family`` names one entry of FAMILIES. A family gives
  build(config) -> the model, an nn.Module whose ``objective`` attribute says how to
      train it (``objective.loss(model, batch, generator, step) -> (loss, stats)``) and
      what an inference step is;
  task(config, data_dir) -> its data side for the trainer (TextTask below for language
      models): ``batch(generator, device)``, ``evaluate(model, device, autocast)`` and
      ``sample(model, step)``. Building the task may fill config fields taken from the
      data (the vocabulary size), so it runs before ``build``.
  data_dir(data, config) -> what ``loopdb train --data`` resolves to (text families:
      a prepared corpus, the default one prepared on first use; image families: the
      --data path, or None for the embedded digits).
The CLI's ``score`` and ``sample`` hand a run to ``family.score`` / ``family.sample``
when the family has its own; otherwise the language-model commands apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import data as data_lib
from . import engine
from .config import Config


class TextTask:
    """Token windows of a prepared corpus (loopdb.data) for next-token language models."""

    def __init__(self, config: Config, data_dir):
        self.config = config
        meta = data_lib.load_meta(Path(data_dir))
        config.model.vocab_size = meta["vocab_size"]
        self.train_tokens = data_lib.load_tokens(data_dir, "train")
        self.val_tokens = data_lib.load_tokens(data_dir, "val")
        self.tokenizer = data_lib.load_tokenizer(data_dir)
        self.token_bytes = torch.as_tensor(self.tokenizer.token_bytes)

    def batch(self, generator: torch.Generator, device) -> torch.Tensor:
        train = self.config.train
        return data_lib.sample_windows(self.train_tokens, train.batch_size, self.config.model.context + 1,
                                       generator).to(device)

    def evaluate(self, model, device, autocast) -> dict:
        """Validation bits per byte at each of ``eval_loops`` (dense models: K = 1 only)."""
        train = self.config.train
        windows = data_lib.eval_windows(self.val_tokens, self.config.model.context, train.eval_windows)
        results = {}
        with autocast():
            for loops in train.eval_loops if model.objective.has_loops else (1,):
                results[f"val/bpb@{loops}"] = engine.bits_per_byte(
                    model, windows, self.token_bytes, loops, samples=train.eval_samples,
                    seed=train.seed, device=device)
        return results

    def sample(self, model, step: int, num_loops: int = 4, tokens: int = 48) -> str:
        prompt = self.tokenizer.encode("\n")
        ids = engine.generate(model, prompt, tokens, num_loops, temperature=1.0, top_k=50, seed=step)
        return self.tokenizer.decode(ids)


def text_data_dir(data: str | None, config: Config) -> Path:
    from .cli import resolve_data_dir

    return resolve_data_dir(data, config.train.data_vocab_size)


def image_data_dir(data: str | None, config: Config) -> Path | None:
    return Path(data) if data else None


def _image_task(config: Config, data_dir):
    from .images import ImageTask

    return ImageTask(config, data_dir)


def _image_command(name: str):
    def command(args, sampler):
        from . import images

        return getattr(images, name)(args, sampler)

    return command


@dataclass(frozen=True)
class Family:
    build: Callable[[Config], torch.nn.Module]
    task: Callable[[Config, Path], object] = TextTask
    data_dir: Callable[[str | None, Config], Path | None] = text_data_dir
    score: Callable | None = None   # score(args, sampler) -> exit code, for `loopdb score`
    sample: Callable | None = None  # sample(args, sampler) -> exit code, for `loopdb sample`


def _looped(config: Config):
    from .looped import LoopedLM
    from .objectives import make_objective

    return LoopedLM(config.model, config.diffusion, make_objective(config.train))


def _stacked(config: Config):
    from .stacked import build_stacked

    return build_stacked(config)


def _vit(config: Config):
    from .vit import ViTClassifier

    return ViTClassifier(config)


def _dit(config: Config):
    from .dit import DiTDenoiser

    return DiTDenoiser(config)


_IMAGES = dict(task=_image_task, data_dir=image_data_dir, score=_image_command("score"),
               sample=_image_command("sample"))

FAMILIES: dict[str, Family] = {
    "looped": Family(build=_looped),
    "stacked": Family(build=_stacked),
    "vit": Family(build=_vit, **_IMAGES),
    "dit": Family(build=_dit, **_IMAGES),
}


def family_of(config: Config) -> Family:
    return FAMILIES[config.model.family]


def build_model(config: Config) -> torch.nn.Module:
    return family_of(config).build(config)
