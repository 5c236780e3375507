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

from .. import data as data_lib
from ..readouts import scoring as engine
from ..config import Config


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
    from ..cli import resolve_data_dir

    return resolve_data_dir(data, config.train.data_vocab_size)


def image_data_dir(data: str | None, config: Config) -> Path | None:
    return Path(data) if data else None


def _image_task(config: Config, data_dir):
    from ..images import ImageTask

    return ImageTask(config, data_dir)


def _image_command(name: str):
    def command(args, sampler):
        from .. import images

        return getattr(images, name)(args, sampler)

    return command


class MaskedTextTask(TextTask):
    """Token windows for the masked diffusion LM (loopdb.masked): every token of a window is
    a target, so windows hold ``context`` tokens and validation windows tile the split."""

    def batch(self, generator: torch.Generator, device) -> torch.Tensor:
        return data_lib.sample_windows(self.train_tokens, self.config.train.batch_size, self.config.model.context,
                                       generator).to(device)

    def evaluate(self, model, device, autocast) -> dict:
        """Validation ELBO bits per byte (ELBO_T_SAMPLES draws per window, seeded)."""
        from ..models import masked

        train = self.config.train
        windows = data_lib.eval_windows(self.val_tokens, self.config.model.context, train.eval_windows, overlap=0)
        with autocast():
            result = masked.elbo_bits_per_byte(model, windows, self.token_bytes, seed=train.seed, device=device)
        return {"val/elbo_bpb": result["bpb"]}

    def sample(self, model, step: int, tokens: int = 48) -> str:
        from ..models import masked

        ids = masked.sample(model, min(tokens, self.config.model.context), generator=torch.Generator().manual_seed(step))
        return self.tokenizer.decode(ids[0])


@dataclass(frozen=True)
class Family:
    build: Callable[[Config], torch.nn.Module]
    task: Callable[[Config, Path], object] = TextTask
    data_dir: Callable[[str | None, Config], Path | None] = text_data_dir
    score: Callable | None = None   # score(args, sampler) -> exit code, for `loopdb score`
    sample: Callable | None = None  # sample(args, sampler) -> exit code, for `loopdb sample`


def _looped(config: Config):
    from ..models.looped import LoopedLM
    from ..objectives.next_token import make_objective

    return LoopedLM(config.model, config.diffusion, make_objective(config.train))


def _stacked(config: Config):
    from ..models.stacked import build_stacked

    return build_stacked(config)


def _vit(config: Config):
    from ..models.vit import ViTClassifier

    return ViTClassifier(config)


def _dit(config: Config):
    from ..models.dit import DiTDenoiser

    return DiTDenoiser(config)


_IMAGES = dict(task=_image_task, data_dir=image_data_dir, score=_image_command("score"),
               sample=_image_command("sample"))

def _masked(config: Config):
    from ..models.masked import MaskedDiffusionLM, make_masked_objective

    return MaskedDiffusionLM(config.model, config.diffusion, make_masked_objective(config.train.objective))


def _load_masked_run(args, sampler, flag: str, count: int):
    """(model, config, data_dir, tokenizer, device) of an mdm run for `loopdb score` / `loopdb sample`,
    after checking the command's ``count`` (t draws or sampler steps, given as ``flag``) is >= 1."""
    from ..training.checkpoint import load_model, run_data_dir
    from ..cli import UsageError
    from ..training.trainer import resolve_device

    if count < 1:
        raise UsageError(f"{flag} {count}: must be >= 1")
    if sampler:
        raise UsageError(f"a masked diffusion run has no sampler settings to override ({', '.join(sampler)}); "
                         "use --steps, --temperature or --top-k")
    device = resolve_device(args.device)
    model, config = load_model(args.run, device)
    data_dir = run_data_dir(args.run)
    return model, config, data_dir, data_lib.load_tokenizer(data_dir), device


def _masked_score(args, sampler) -> int:
    """`loopdb score` of an mdm run: the ELBO in bits per byte (and per character) on a split."""
    import json
    import math

    from tqdm import tqdm

    from ..models import masked

    t_samples = masked.ELBO_T_SAMPLES if args.t_samples is None else args.t_samples
    model, config, data_dir, tokenizer, device = _load_masked_run(args, sampler, "--t-samples", t_samples)
    tokens = data_lib.load_tokens(data_dir, args.split)
    windows = data_lib.eval_windows(tokens, config.model.context, args.max_windows, overlap=0)
    with tqdm(total=len(windows), desc="score ELBO", disable=args.json or args.quiet, leave=False) as bar:
        result = masked.elbo_bits_per_byte(model, windows, torch.as_tensor(tokenizer.token_bytes), t_samples,
                                           args.seed, args.batch_size, device, progress=bar)
    characters = sum(len(tokenizer.decode(window)) for window in windows)
    bits = result["nats"] / math.log(2)
    report = {"bpb": {"elbo": result["bpb"]}, "bpc": {"elbo": bits / max(characters, 1)}, "readout": "elbo",
              "t_samples": t_samples, "objective": config.train.objective,
              "num_blocks": config.model.num_blocks, "split": args.split, "seed": args.seed,
              "windows": len(windows), "tokens": result["tokens"], "bytes": result["bytes"],
              "characters": characters, "unigram_bpb": data_lib.load_meta(data_dir)["unigram_test_bpb"]}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.split} ELBO ({t_samples} t draws per window, {len(windows)} windows, "
              f"objective {config.train.objective}):")
        print(f"  bits per byte {report['bpb']['elbo']:.4f}   bits per character {report['bpc']['elbo']:.4f}")
        print(f"  unigram (test) {report['unigram_bpb']:.4f} bits per byte")
    return 0


def _masked_sample(args, sampler) -> int:
    """`loopdb sample` of an mdm run: --steps ancestral unmasking steps after the prompt."""
    from ..models import masked
    from ..cli import UsageError

    steps = masked.SAMPLE_STEPS if args.loops is None else args.loops
    model, config, _, tokenizer, _ = _load_masked_run(args, sampler, "--steps", steps)
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    new_tokens = config.model.context - len(prompt) if args.max_new_tokens is None else args.max_new_tokens
    if new_tokens < 1 or len(prompt) + new_tokens > config.model.context:
        raise UsageError(f"--max-new-tokens {new_tokens}: a prompt of {len(prompt)} tokens and at least one new "
                         f"token must fit the model's {config.model.context}-token window")
    ids = masked.sample(model, len(prompt) + new_tokens, steps, prompt, temperature=args.temperature,
                        top_k=args.top_k or None, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(ids[0]))
    return 0


FAMILIES: dict[str, Family] = {
    "looped": Family(build=_looped),
    "stacked": Family(build=_stacked),
    "vit": Family(build=_vit, **_IMAGES),
    "dit": Family(build=_dit, **_IMAGES),
    "mdm": Family(build=_masked, task=MaskedTextTask, score=_masked_score, sample=_masked_sample),
}


def family_of(config: Config) -> Family:
    return FAMILIES[config.model.family]


def build_model(config: Config) -> torch.nn.Module:
    return family_of(config).build(config)
