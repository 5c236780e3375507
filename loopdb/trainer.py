"""The trainer: AdamW, warmup + cosine, clipping, accumulation, evaluation at
several loop counts, tensorboard, atomic checkpoints and exact resume.

Every random draw of a training step (the batch, sigma, the noise) comes from a
generator seeded by (seed, step, micro-step), so a resumed run draws exactly what
an uninterrupted one would (Huginn seeds its depth sampler the same way).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import data as data_lib
from . import engine
from .checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from .config import Config, ConfigError
from .looped import LoopedLM
from .objectives import diffusion_blocks_loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use --device=cpu")
    return device


def learning_rate(step: int, config: Config) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    train = config.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) % (2**63))


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    train = config.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


class Trainer:
    def __init__(self, config: Config, data_dir, run_dir, resume: bool = False, progress: bool = True,
                 log_tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.data_dir = Path(data_dir)
        self.progress = progress
        meta = data_lib.load_meta(self.data_dir)
        self.train_tokens = data_lib.load_tokens(self.data_dir, "train")
        self.val_tokens = data_lib.load_tokens(self.data_dir, "val")
        self.tokenizer = data_lib.load_tokenizer(self.data_dir)
        self.token_bytes = torch.as_tensor(self.tokenizer.token_bytes)
        self.unigram_test_bpb = meta.get("unigram_test_bpb")

        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        if checkpoint is None and self.run_dir.exists() and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if checkpoint is not None:
            config = Config.load(checkpoint / "config.json").apply_overrides(
                {"max_steps": str(config.train.max_steps)}  # resuming may extend a run, nothing else
            )
        config.model.vocab_size = meta["vocab_size"]
        config.validate()
        self.config = config
        self.device = resolve_device(config.train.device)
        torch.manual_seed(config.train.seed)
        self.model = LoopedLM(config.model, config.diffusion).to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.step = 0
        if checkpoint is not None:
            load_weights(self.model, checkpoint)
            state = load_trainer_state(checkpoint)
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            self.step = state["step"]
        self.train_forward = torch.compile(self.model) if config.train.compile else self.model

        self.run_dir.mkdir(parents=True, exist_ok=True)
        config.save(self.run_dir / "config.json")
        (self.run_dir / "data.json").write_text(json.dumps({"data_dir": str(self.data_dir.resolve())}))
        self.writer = None
        if log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    # -- one optimisation step ---------------------------------------------------------
    def autocast(self):
        if self.config.train.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict:
        train = self.config.train
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss, total_ce = 0.0, 0.0
        for micro in range(train.grad_accum):
            generator = step_generator(train.seed, self.step, micro)
            tokens = data_lib.sample_windows(self.train_tokens, train.batch_size, self.config.model.context + 1,
                                             generator).to(self.device)
            with self.autocast():
                loss, stats = diffusion_blocks_loss(self._loss_model(), tokens, generator)
            (loss / train.grad_accum).backward()
            total_loss += loss.item() / train.grad_accum
            total_ce += stats["ce"].item() / train.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total_loss, "ce": total_ce, "lr": lr, "grad_norm": grad_norm}

    def _loss_model(self):
        # the loss calls model(...) for the training pass and model attributes otherwise
        if self.train_forward is self.model:
            return self.model
        return _CompiledForward(self.model, self.train_forward)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict:
        train = self.config.train
        windows = data_lib.eval_windows(self.val_tokens, self.config.model.context, train.eval_windows)
        self.model.eval()
        results = {}
        with self.autocast():
            for loops in train.eval_loops:
                results[f"val/bpb@{loops}"] = engine.bits_per_byte(
                    self.model, windows, self.token_bytes, loops, samples=train.eval_samples,
                    seed=train.seed, device=self.device)
        return results

    def sample_text(self, num_loops: int = 4, tokens: int = 48) -> str:
        self.model.eval()
        prompt = self.tokenizer.encode("\n")
        with self.autocast():
            ids = engine.generate(self.model, prompt, tokens, num_loops, temperature=1.0, top_k=50, seed=self.step)
        return self.tokenizer.decode(ids)

    # -- the loop ---------------------------------------------------------------------------
    def save(self):
        save_checkpoint(self.run_dir, self.model, self.optimizer, self.step, self.config)

    def log(self, values: dict):
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")

    def train(self) -> dict:
        from tqdm import tqdm

        train = self.config.train
        interrupted = {"flag": False}

        def on_signal(signum, frame):  # finish the step, checkpoint, then stop
            interrupted["flag"] = True

        previous = signal.signal(signal.SIGTERM, on_signal)
        bar = tqdm(total=train.max_steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        tokens_per_step = train.batch_size * train.grad_accum * self.config.model.context
        last_eval = {}
        try:
            while self.step < train.max_steps and not interrupted["flag"]:
                started = time.perf_counter()
                stats = self.train_step()
                elapsed = time.perf_counter() - started
                stats["tokens_per_s"] = tokens_per_step / elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", gnorm=f"{stats['grad_norm']:.2f}",
                                tok_s=f"{stats['tokens_per_s']:.0f}")
                if self.writer is not None:
                    for key, value in stats.items():
                        self.writer.add_scalar(f"train/{key}", value, self.step)
                done = self.step == train.max_steps
                if self.step % train.eval_every == 0 or done:
                    last_eval = self.evaluate()
                    self.log({"train/loss": stats["loss"], **last_eval})
                    bar.write(f"step {self.step}: " + "  ".join(f"{k}={v:.3f}" for k, v in last_eval.items()))
                    if self.writer is not None:
                        self.writer.add_text("sample", self.sample_text(), self.step)
                if self.step % train.checkpoint_every == 0 or done:
                    self.save()
        except KeyboardInterrupt:
            bar.write("interrupted: saving a checkpoint (resume with --resume)")
            self.save()
            raise
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
            if self.writer is not None:
                self.writer.flush()
        if interrupted["flag"]:
            self.save()
        return last_eval


class _CompiledForward:
    """Routes model(...) through the compiled module, everything else to the model."""

    def __init__(self, model, compiled):
        self._model, self._compiled = model, compiled

    def __call__(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)
