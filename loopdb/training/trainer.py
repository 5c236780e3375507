"""The trainer: AdamW, warmup + cosine, clipping, accumulation, evaluation at
several loop counts, tensorboard, atomic checkpoints and exact resume.

Nothing is lost when training goes wrong: a non-finite loss or gradient norm stops the run
before that step changes the weights (or, with ``skip_nonfinite_steps``, skips the step), so
no checkpoint ever holds a non-finite weight; ``--resume`` falls back past a damaged checkpoint
to the newest intact one; a process of a torchrun job that dies or hangs stops the others.

A run folder belongs to one training process at a time (loopdb.runs.lock); a resume may
change only what loopdb.runs.resume allows, and its metrics.jsonl keeps one row per evaluated
step. Ctrl-C or SIGTERM stops any phase promptly (StopSignals); a second one ends the process at once.

Every random draw of a training step (the batch, sigma, the noise) comes from a
generator seeded by (seed, step, micro-step), so a resumed run draws exactly what
an uninterrupted one would (Huginn seeds its depth sampler the same way).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import Config
from ..device import keep_freed_memory, resolve_device
from ..errors import ConfigError, RunError, TrainingError
from ..families import check_config, family_of
from ..runs.checkpoint import (checkpoint_name, checkpoints, has_distributed_state, latest_checkpoint,
                               load_distributed_state, newest_intact_checkpoint, non_finite_weights,
                               save_checkpoint, save_distributed_state, staging_folder, start_checkpoint)
from ..runs.folder import METRICS, keep_metrics_through, last_metrics_step, write_run_files
from ..runs.lock import hold_run_folder, refuse_if_trained, release_run_folder
from ..runs.resume import resume_changes
from . import parallel


def learning_rate(step: int, config: Config) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    train = config.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch. Data-parallel rank r of W, at its micro-step m, draws
    micro-batch m * W + r: the W ranks together draw what one process with W times the
    accumulation draws."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) % (2**63))


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    train = config.train
    # frozen parameters (e.g. the blocks a block-wise run does not train) get no group and no state
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while installed (``with``). The first asks to stop: where work
    may be ``abandon``ed (data preparation, an evaluation), KeyboardInterrupt is raised at once;
    elsewhere (a training step, a checkpoint being written) it only sets ``asked``, which the
    training loop reads after the step. A second signal ends the process at once: the newest
    complete checkpoint stays `latest`, and the OS releases the run folder's lock."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, abandon: bool):
        self.abandon = abandon
        self.asked = False
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exception) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextmanager
    def abandoning(self, allowed: bool = True):
        """Work a stop signal may cut short (``allowed``: else it finishes, as a step does)."""
        before, self.abandon = self.abandon, allowed
        try:
            yield
        finally:
            self.abandon = before

    def _on_signal(self, signum, frame) -> None:
        if self.asked:
            print(f"loopdb train: second {signal.Signals(signum).name}: stopped at once; the newest complete "
                  "checkpoint is `latest`", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.asked = True
        if self.abandon:
            raise KeyboardInterrupt


class Trainer:
    def __init__(self, config: Config, data_dir, run_dir, resume: bool = False, progress: bool = True,
                 log_tensorboard: bool = True, block_parallel: bool = False, preset: str | None = None):
        """``preset``: the name the config was made from (recorded; a resume from another is refused).
        Under torchrun (WORLD_SIZE > 1) the run is data-parallel (DDP, or FSDP2 with
        data_parallel=fsdp), or block-parallel with ``block_parallel`` (loopdb.training.parallel);
        rank 0 evaluates (FSDP: every rank) and logs, every rank saves its shards."""
        self.run_dir = Path(run_dir)
        self.data_dir = None if data_dir is None else Path(data_dir)  # None: the family's embedded data
        self.progress = progress
        refuse_if_trained(self.run_dir)  # early, before the data and the model are loaded
        saved = self._resume_point() if resume else None
        if not resume and self.run_dir.exists() and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        changes = []
        if saved is not None:  # the command line's config, once it is known to keep the run's model and data
            changes = resume_changes(self.run_dir, saved.config, config, self.data_dir, saved.trainer_state["step"],
                                     preset)
        family = family_of(config)
        self.feed = family.feed(config, self.data_dir)  # may fill in data-given fields (vocab_size)
        self.config = check_config(config)
        self.device = resolve_device(config.train.device)
        self.group, self.owned_blocks = self._join_processes(config, block_parallel)
        if self.group.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.group.local_rank)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on each step's large activations
        torch.manual_seed(config.train.seed)
        # the model and its loss (the model holds none; loopdb.sampling reads it at inference)
        if self.owned_blocks is None:
            self.model = family.build(config).to(self.device)
            self.objective = family.objective(config)
        else:  # this rank allocates and trains its own blocks only
            self.model = family.build_for_blocks(config, self.owned_blocks).to(self.device)
            self.objective = family.objective_for_blocks(config, self.owned_blocks)
        self.wrapper = self._wrap_for_ranks()  # DDP or FSDP around the whole step; None: one process
        self.optimizer = make_optimizer(self.model, config)
        family.after_optimizer(self.model, self.optimizer, self.device, self.group.world_size > 1)
        self.step = 0
        self.skipped_in_a_row = self.skipped_steps = 0  # non-finite steps skipped (skip_nonfinite_steps)
        self.saved_step = None  # the step of the newest checkpoint: a stop saves only a model that changed since
        if saved is not None:
            state = saved.trainer_state
            self._check_micro_batches(state["extra"].get("micro_batches_per_step"))
            self._load(saved)
            torch.set_rng_state(state["rng"]["torch"])
            self.step = self.saved_step = state["step"]
            self.skipped_in_a_row = state["extra"].get("skipped_in_a_row", 0)
            self.skipped_steps = state["extra"].get("skipped_steps", 0)
        self.train_forward = torch.compile(self.model) if config.train.compile else self.model

        self.writer = None
        self.logged_step = None  # the newest step metrics.jsonl has a row for (rank 0)
        if not self.group.is_main:
            return
        # before the first write (checkpoints are renamed into place, so reading needs no lock); the
        # job's other processes write only into the checkpoints rank 0 starts
        hold_run_folder(self.run_dir)
        write_run_files(self.run_dir, config, self.data_dir, preset)
        if saved is not None:
            keep_metrics_through(self.run_dir, self.step)  # the rows after the checkpoint are logged again
            self.logged_step = last_metrics_step(self.run_dir)
            if changes:
                print(f"loopdb train: resuming from {saved.path.name} with {', '.join(changes)} (run -> command line)",
                      file=sys.stderr)
        if log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resume hides the events logged after its checkpoint (they are logged again)
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=None if saved is None else self.step + 1)

    def _resume_point(self):
        """The newest intact checkpoint of the run (a damaged newer one is passed over, with a warning)."""
        say = _warn if parallel.rank_from_env() == 0 else (lambda message: None)
        saved = newest_intact_checkpoint(self.run_dir, say)
        if saved is None:
            found = len(checkpoints(self.run_dir))
            raise ConfigError(f"--resume: {self.run_dir} has no checkpoint to resume from" if not found else
                              f"--resume: none of the {found} checkpoint(s) in {self.run_dir} is intact (see the "
                              "warnings above); restore one from a copy or start a new run")
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and saved.path.name != latest.name:
            say(f"resuming from {saved.path.name}, the newest intact checkpoint; the steps after it are trained "
                "again, exactly as before")
        return saved

    @property
    def micro_batches_per_step(self) -> int:
        """The batch of one step, in micro-batches, over the whole job (what a resume must keep)."""
        return self.config.train.grad_accum * self.batch_draws[0]

    def _check_micro_batches(self, saved: int | None) -> None:
        """grad_accum may change on resume with the number of processes, as long as a step's batch stays."""
        if saved is not None and saved != self.micro_batches_per_step:
            raise ConfigError(f"--resume: a step of the run drew {saved} micro-batches (grad_accum x data-parallel "
                              f"processes), grad_accum={self.config.train.grad_accum} with {self.batch_draws[0]} "
                              f"process(es) draws {self.micro_batches_per_step}; keep the product at {saved}")

    def _load(self, saved) -> None:
        """Weights and optimizer state of the resume point: a multi-process checkpoint's shards
        (each rank its share), else the single-process checkpoint's files."""
        if has_distributed_state(saved.path):
            load_distributed_state(saved.path, self.model, self.optimizer)
            return
        if self.block_parallel or self.sharded:
            raise ConfigError(f"--resume: {saved.path.name} was written by one process; a block-parallel or "
                              "data_parallel=fsdp run resumes a multi-process checkpoint only (resume it with one process)")
        self.model.load_state_dict(saved.weights)
        self.optimizer.load_state_dict(saved.trainer_state["optimizer"])

    @staticmethod
    def _join_processes(config: Config, block_parallel: bool):
        """(group, blocks this rank owns or None): the torchrun job this process belongs to."""
        refusal = family_of(config).block_parallel_refusal(config) if block_parallel else None
        if refusal:
            raise ConfigError(refusal)
        if parallel.world_size_from_env() > 1 and config.train.time_budget_minutes > 0:
            raise ConfigError("time_budget_minutes is single-process only (ranks would stop at different steps)")
        if block_parallel and config.train.data_parallel == "fsdp":
            raise ConfigError("--block-parallel already splits the model by blocks; drop data_parallel=fsdp")
        group = parallel.init_from_env(resolve_device(config.train.device).type, config.train.collective_timeout_minutes)
        if not block_parallel:
            return group, None
        try:
            return group, parallel.owned_blocks(config.model.num_blocks, group)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def block_parallel(self) -> bool:
        return self.owned_blocks is not None

    @property
    def batch_draws(self) -> tuple[int, int]:
        """(ranks drawing their own micro-batches, this rank's index among them): data-parallel
        ranks draw their own, block-parallel ranks all train on one batch."""
        return (1, 0) if self.block_parallel else (self.group.world_size, self.group.rank)

    @property
    def sharded(self) -> bool:
        """FSDP: every rank holds a share of each tensor, so every rank runs evaluation as well."""
        return self.group.world_size > 1 and self.config.train.data_parallel == "fsdp"

    def _wrap_for_ranks(self):
        """DDP (data-parallel; block-parallel: the shared parameters only) or FSDP around the
        whole training step, or None for one process (or nothing shared to average)."""
        if self.group.world_size == 1:
            return None
        if self.sharded:
            return parallel.fully_sharded(self.model, self.group, self.device)
        ignored = set()
        if self.block_parallel:  # each rank's own blocks (and the meta stand-ins of the others)
            shared = {id(p) for p in self.model.shared_parameters()}
            if not any(p.requires_grad for p in self.model.shared_parameters()):
                return None
            ignored = {name for name, p in self.model.named_parameters() if id(p) not in shared}
            ignored |= {name for name, buffer in self.model.named_buffers() if buffer.is_meta}
        # block-parallel: DDP sees only the shared parameters, and every step trains them all (test_stacked checks)
        every_parameter_used = self.block_parallel or family_of(self.config).trains_every_parameter(self.config)
        return parallel.data_parallel(self.model, self.group, self.device, ignored, every_parameter_used)

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
        totals = {"loss": 0.0}
        draws, draw = self.batch_draws
        for micro in range(train.grad_accum):
            generator = step_generator(train.seed, self.step, micro * draws + draw)
            batch = self.feed.batch(generator, self.device)
            with parallel.gradient_sync(self.wrapper, sync=micro == train.grad_accum - 1):
                with self.autocast():
                    loss, stats = self._run(lambda: self.objective.loss(self._loss_model(), batch, generator, self.step))
                (loss / train.grad_accum).backward()
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + float(torch.as_tensor(value).detach()) / train.grad_accum
        grad_norm = self._synchronise_and_clip()
        # every rank takes this step or none does (a block-parallel rank sees its own blocks' norm only)
        finite = parallel.all_agree(math.isfinite(totals["loss"]) and math.isfinite(grad_norm), self.group, self.device)
        if finite:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self._skip_or_stop(totals["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**totals, "lr": lr, "grad_norm": grad_norm}

    def _skip_or_stop(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient norm: TrainingError before the weights change, or (with
        skip_nonfinite_steps) a step without an update, until too many come in a row."""
        limit = self.config.train.skip_nonfinite_steps
        self.skipped_in_a_row += 1
        self.skipped_steps += 1
        what = f"step {self.step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if self.skipped_in_a_row > limit:
            in_a_row = f" ({self.skipped_in_a_row} non-finite steps in a row)" if limit else ""
            raise TrainingError(f"{what}{in_a_row}: training stopped before it changed the weights; "
                                f"{self._stop_advice()}")
        if self.group.is_main:
            _warn(f"{what}: skipped without an update ({self.skipped_in_a_row} in a row, at most {limit}; "
                  f"{self.skipped_steps} in all)")

    def _stop_advice(self) -> str:
        """Where the run stands after a non-finite stop, and the likely causes."""
        train = self.config.train
        latest = latest_checkpoint(self.run_dir)
        kept = f"the newest good checkpoint {latest.name} stays `latest`" if latest else "no checkpoint was written"
        return (f"{kept}. Likely causes: the learning rate (lr={train.lr:g}; try 10x lower), weak gradient "
                f"clipping (grad_clip={train.grad_clip:g}; 1 is the usual), bf16 overflow (bf16={train.bf16}); "
                "or pass --skip_nonfinite_steps=N to skip up to N such steps in a row")

    def _run(self, compute, training: bool = True):
        """``compute()``, inside the DDP / FSDP wrapper's forward where it must be: a training pass (so
        the gradient reduction sees every parameter used), and under FSDP any pass (so the shards are gathered)."""
        inside = self.wrapper is not None and (training or self.sharded)
        return self.wrapper(compute) if inside else compute()

    def _synchronise_and_clip(self) -> float:
        """Clip the gradients (averaged over ranks by DDP or FSDP in backward); block-parallel clips
        the shared gradients on their own so every rank takes the same shared step. Returns the
        pre-clip norm of this rank's own gradients (FSDP: of the whole model's)."""
        clip = self.config.train.grad_clip
        if not self.block_parallel:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        shared = self.model.shared_parameters()
        torch.nn.utils.clip_grad_norm_([p for p in shared if p.grad is not None], clip)
        owned = [p for index in self.owned_blocks for p in self.model.block_parameters(index) if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(owned, clip).item()

    def _loss_model(self):
        # the loss calls model(...) for the training pass and model attributes otherwise
        if self.train_forward is self.model:
            return self.model
        return _CompiledForward(self.model, self.train_forward)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.model.eval()
        return self._run(lambda: self.feed.evaluate(self.model, self.device, self.autocast), training=False)

    def sample_text(self) -> str | None:
        self.model.eval()
        with self.autocast():
            return self._run(lambda: self.feed.sample_text(self.model, self.step), training=False)

    # -- the loop ---------------------------------------------------------------------------
    def save(self):
        """Checkpoint the step. Several processes: every rank writes its shards (weights and optimizer
        state, for an exact --resume) into the checkpoint folder, then rank 0 completes it with the
        whole model's weights; every rank calls this, and every rank stops if any save fails."""
        distributed = self.group.world_size > 1
        held = {key: value.to_local() if hasattr(value, "to_local") else value  # FSDP: this rank's shard
                for key, value in self.model.state_dict().items() if not value.is_meta}
        bad = non_finite_weights(held)
        if not parallel.all_agree(not bad, self.group, self.device):
            # finite loss and gradients, yet an update overflowed: keep the good checkpoint
            first = f" (first: {bad[0]})" if bad else " on another rank"
            raise TrainingError(f"step {self.step}: weight tensor(s) became non-finite{first}, "
                                f"not saved as {checkpoint_name(self.step)}; {self._stop_advice()}")
        extra = {"skipped_in_a_row": self.skipped_in_a_row, "skipped_steps": self.skipped_steps,
                 "micro_batches_per_step": self.micro_batches_per_step}
        if not distributed:
            save_checkpoint(self.run_dir, self.model, self.optimizer, self.step, self.config, extra=extra)
            self.saved_step = self.step
            return
        self._on_main_then_agree(lambda: start_checkpoint(self.run_dir, self.step))
        save_distributed_state(staging_folder(self.run_dir, self.step), self.model, self.optimizer)  # a failure is raised on every rank
        weights = parallel.consolidated_weights(self.model, self.group, self.owned_blocks, self.sharded)
        # the optimizer state lives in the shards only
        self._on_main_then_agree(lambda: save_checkpoint(self.run_dir, None, None, self.step, self.config, extra=extra,
                                                         weights=weights, staged=True))
        self.saved_step = self.step

    def _on_main_then_agree(self, action) -> None:
        """Run ``action`` on rank 0; if it fails, rank 0 raises its error and every other rank one line."""
        failure = None
        if self.group.is_main:
            try:
                action()
            except RunError as error:
                failure = error
        if not parallel.all_agree(failure is None, self.group, self.device):
            raise failure or RunError(f"rank 0 could not save checkpoint {checkpoint_name(self.step)} (see its message)")

    def log(self, values: dict):
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, self.step)
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")
        self.logged_step = self.step

    def train(self) -> dict:
        """Train to max_steps: evaluate every eval_every steps and at the end, checkpoint every
        checkpoint_every steps and at the end. Ctrl-C or SIGTERM (see StopSignals): the step being
        trained finishes (an evaluation is abandoned), a checkpoint is saved if the model changed
        since the last one, and KeyboardInterrupt is raised; a second signal ends the process at once."""
        from tqdm import tqdm

        train = self.config.train
        bar = tqdm(total=train.max_steps, initial=self.step, disable=not (self.progress and self.group.is_main),
                   desc="train", unit="step")
        tokens_per_step = train.batch_size * train.grad_accum * self.config.model.context * self.batch_draws[0]  # the job's
        last_eval = {}
        step_seconds, budget_seconds, cpu_seconds = [], [], []  # budget_seconds: on the time_budget_clock
        stopping, train_loss = False, None
        try:
            with StopSignals(abandon=False) as stop:
                while self.step < train.max_steps and not (stopping := self._stop_agreed(stop.asked)):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    stats = self.train_step()
                    elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
                    step_seconds.append(elapsed)
                    cpu_seconds.append(elapsed_cpu)
                    budget_seconds.append(elapsed_cpu if train.time_budget_clock == "cpu" else elapsed)
                    stats["tokens_per_s"] = tokens_per_step / elapsed
                    train_loss = stats["loss"]
                    if train.time_budget_minutes > 0:
                        self._fit_budget(budget_seconds, bar)
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", gnorm=f"{stats['grad_norm']:.2f}",
                                    tok_s=f"{stats['tokens_per_s']:.0f}")
                    if self.writer is not None:
                        for key, value in stats.items():
                            self.writer.add_scalar(f"train/{key}", value, self.step)
                    if self.step == train.max_steps:
                        break  # the closing evaluation and checkpoint follow
                    # rank 0 evaluates (FSDP: every rank, each holding a share); block-parallel: at the end only
                    if self.step % train.eval_every == 0 and not self.block_parallel:
                        last_eval = self._evaluate_and_log(train_loss, bar, stop)
                    if self.step % train.checkpoint_every == 0:
                        self.save()  # every rank: several processes write their shards together
                if not stopping and self.step >= train.max_steps:
                    last_eval = self._close(train_loss, bar, stop) or last_eval
                    stopping = self._stop_agreed(stop.asked)  # a signal during the closing evaluation
                if stopping:
                    self._save_if_changed()
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.flush()
            release_run_folder(self.run_dir)
        if self.group.is_main:
            self._write_summary(step_seconds, tokens_per_step, sum(cpu_seconds))
        parallel.barrier(self.group)
        return last_eval

    def _close(self, train_loss: float | None, bar, stop: "StopSignals") -> dict:
        """The end of the run: the closing evaluation (unless a resumed run already has it) and checkpoint."""
        if self.block_parallel:
            self._assemble()  # rank 0 gathers the whole model
        evaluated = self.logged_step == self.step or not self.group.is_main  # rank 0 knows
        evaluation = {}
        if not parallel.all_agree(evaluated, self.group, self.device) and (self.group.is_main or self.sharded):
            evaluation = self._evaluate_and_log(train_loss, bar, stop)
        self._save_if_changed()
        return evaluation

    def _save_if_changed(self) -> None:
        """Checkpoint the step unless it is saved already (or is step 0: nothing trained yet)."""
        if self.step > 0 and self.saved_step != self.step:
            self.save()

    def _stop_agreed(self, asked: bool) -> bool:
        """A stop signal on any process stops every process of the job at the same step."""
        return asked if self.group.world_size == 1 else not parallel.all_agree(not asked, self.group, self.device)

    def _evaluate_and_log(self, train_loss: float | None, bar, stop: "StopSignals") -> dict:
        """Evaluate and log a row; {} if a stop signal abandons it (FSDP ranks, which evaluate together,
        finish it)."""
        try:
            with stop.abandoning(not self.sharded):
                evaluation = self.evaluate()
                sample = self.sample_text()
        except KeyboardInterrupt:
            bar.write(f"step {self.step}: evaluation abandoned (stop signal)", file=sys.stderr)
            return {}
        if self.group.is_main:
            self.log(({} if train_loss is None else {"train/loss": train_loss}) | evaluation)
            bar.write(f"step {self.step}: " + "  ".join(f"{k}={v:.3f}" for k, v in evaluation.items()))
            if self.writer is not None and sample is not None:
                self.writer.add_text("sample", sample, self.step)
        return evaluation

    def _assemble(self) -> None:
        """Block-parallel: rank 0 gathers every rank's blocks into one whole model."""
        blocks = parallel.gather_blocks(self.model, self.owned_blocks, self.group)
        if blocks is None:
            return
        device = next(p.device for p in self.model.parameters() if not p.is_meta)
        for index, state in blocks.items():
            self.model.materialize_block(index, device).load_state_dict(state)

    def _fit_budget(self, step_seconds: list[float], bar) -> None:
        """With a time budget, set max_steps from the measured step time (re-estimated every
        10 steps, so the cosine schedule ends when the budget does). Evaluation time is not counted.
        ``step_seconds`` are on ``time_budget_clock``: CPU time makes a budget mean the same compute
        however many other processes share the cores (with one thread, it is the quiet wall time)."""
        train = self.config.train
        budget, spent = train.time_budget_minutes * 60, sum(step_seconds)
        if spent >= budget:
            train.max_steps = self.step
        elif len(step_seconds) % 10 == 0:
            recent = sorted(step_seconds[-50:])[len(step_seconds[-50:]) // 2]
            train.max_steps = max(self.step + 1, self.step + int((budget - spent) / recent))
        bar.total = train.max_steps

    def _write_summary(self, step_seconds: list[float], tokens_per_step: int, cpu_seconds: float) -> None:
        """What a comparison needs from a finished run: steps, tokens, step time, peak memory."""
        import resource

        ordered = sorted(step_seconds) or [0.0]
        summary = {
            "objective": self.config.train.objective,
            "steps": self.step,
            "tokens_seen": self.step * tokens_per_step,
            "train_seconds": sum(step_seconds),
            "train_cpu_seconds": cpu_seconds,  # this process's CPU time in the steps (all its threads)
            "step_ms": 1000 * ordered[len(ordered) // 2],
            # resident-set high-water mark of this process (Linux reports KiB)
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": self.model.num_parameters(),
            "skipped_nonfinite_steps": self.skipped_steps,
        }
        (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))


def _warn(message: str) -> None:
    print(f"loopdb train: warning: {message}", file=sys.stderr)


class _CompiledForward:
    """Routes model(...) through the compiled module, everything else to the model."""

    def __init__(self, model, compiled):
        self._model, self._compiled = model, compiled

    def __call__(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)
