"""The language-model families: looped (docs/method.md#looped-lm), stacked (3.2) and the masked diffusion
LM mdm (3.3), with their data side for the trainer (token windows of a prepared corpus)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data.preparation import resolve_data_dir
from ..data.storage import load_meta, load_tokenizer, load_tokens, task_data_dir
from ..data.windows import eval_windows, sample_windows
from ..config import Config
from ..models.joint import JointDiffusionLM
from ..models.looped import LoopedLM
from ..models.recurrent import RecurrentDepthLM
from ..models.masked import MaskedDiffusionLM
from ..models.stacked import HostOffload, StackedLM
from ..objectives.drafting import DraftDiffusionObjective
from ..objectives.joint import JointDiffusionObjective
from ..objectives.masked import make_masked_objective
from ..objectives.next_token import DenseObjective, StackedDiffusionObjective, make_objective
from ..readouts import masked as masked_readouts
from ..readouts.generation import generate
from ..readouts.scoring import bits_per_byte
from ..sampling import OBJECTIVE_LOOPS, sampler_of
from ..tasks import get_task
from .reasoning import ReasoningFeed
from .spec import BLOCK_PARALLEL_HELP, Family, dense_trains_every_parameter


class TextFeed:
    """Token windows of a prepared corpus (loopdb.data) for next-token language models."""

    def __init__(self, config: Config, data_dir):
        self.config = config
        meta = load_meta(Path(data_dir))
        config.model.vocab_size = meta["vocab_size"]
        self.train_tokens = load_tokens(data_dir, "train")
        self.val_tokens = load_tokens(data_dir, "val")
        self.tokenizer = load_tokenizer(data_dir)
        self.token_bytes = torch.as_tensor(self.tokenizer.token_bytes)

    def batch(self, generator: torch.Generator, device) -> torch.Tensor:
        train = self.config.train
        return sample_windows(self.train_tokens, train.batch_size, self.config.model.context + 1,
                              generator).to(device)

    def evaluate(self, model, device, autocast) -> dict:
        """Validation bits per byte at each of ``eval_loops`` (dense models: K = 1 only)."""
        train = self.config.train
        windows = eval_windows(self.val_tokens, self.config.model.context, train.eval_windows)
        results = {}
        with autocast():
            for loops in train.eval_loops if sampler_of(model).has_loops else (1,):
                results[f"val/bpb@{loops}"] = bits_per_byte(
                    model, windows, self.token_bytes, loops, samples=train.eval_samples,
                    seed=train.seed, device=device)
        return results

    def sample_text(self, model, step: int, num_loops: int = 4, tokens: int = 48) -> str:
        prompt = self.tokenizer.encode("\n")
        ids = generate(model, prompt, tokens, num_loops, temperature=1.0, top_k=50, seed=step)
        return self.tokenizer.decode(ids)


class MaskedTextFeed(TextFeed):
    """Token windows for the masked diffusion LM: every token of a window is a target, so
    windows hold ``context`` tokens and validation windows tile the split."""

    def batch(self, generator: torch.Generator, device) -> torch.Tensor:
        return sample_windows(self.train_tokens, self.config.train.batch_size, self.config.model.context,
                              generator).to(device)

    def evaluate(self, model, device, autocast) -> dict:
        """Validation ELBO bits per byte (ELBO_T_SAMPLES draws per window, seeded)."""
        train = self.config.train
        windows = eval_windows(self.val_tokens, self.config.model.context, train.eval_windows, overlap=0)
        with autocast():
            result = masked_readouts.elbo_bits_per_byte(model, windows, self.token_bytes, seed=train.seed,
                                                        device=device)
        return {"val/elbo_bpb": result["bpb"]}

    def sample_text(self, model, step: int, tokens: int = 48) -> str:
        ids = masked_readouts.sample_masked(model, min(tokens, self.config.model.context),
                                            generator=torch.Generator().manual_seed(step))
        return self.tokenizer.decode(ids[0])


def text_data_dir(data: str | None, config: Config) -> Path:
    return resolve_data_dir(data, config.train.data_vocab_size)


# -- looped ------------------------------------------------------------------------------------------
def _build_looped(config: Config):
    """Sequence recurrence (Huginn's wiring: loopdb.models.recurrent) or the per-position loop
    of the DiffusionBlocks LM (loopdb.models.looped), as ``config.recurrence`` says."""
    train = config.train
    if _joint(config):
        return JointDiffusionLM(config.model, config.diffusion, targets_are_next_tokens=not train.task,
                                prompt_openers=prompt_openers(config))
    loop = OBJECTIVE_LOOPS[train.objective]
    if config.recurrence == "sequence":
        return RecurrentDepthLM(config.model, loop, exit_gate=train.objective == "ouro")
    return LoopedLM(config.model, config.diffusion, loop, anchor_head=train.anchor_weight > 0)


def prompt_openers(config: Config) -> list[int] | None:
    """The token ids that end a task's prompt when the run holds it clean (``clean_prompt``), else None."""
    return get_task(config.train.task).opener_ids() if config.diffusion.clean_prompt else None


def _joint(config: Config) -> bool:
    """Sequence-joint DiffusionBlocks (loopdb.models.joint): diffusion with sequence recurrence."""
    return config.train.objective == "diffusion" and config.recurrence == "sequence"


def _looped_objective(config: Config):
    """DiffusionBlocks with drafts or the anchor head when asked for, sequence-joint DiffusionBlocks
    with sequence recurrence, else the plain objectives."""
    train = config.train
    if _joint(config):
        return JointDiffusionObjective()
    if train.objective == "diffusion" and (config.model.draft_width > 1 or train.anchor_weight > 0):
        return DraftDiffusionObjective(train.anchor_weight, train.draft_fraction)
    return make_objective(train)


def _looped_feed(config: Config, data_dir):
    return ReasoningFeed(config, data_dir) if config.train.task else TextFeed(config, data_dir)


def _looped_data_dir(data: str | None, config: Config) -> Path:
    return task_data_dir(config.train.task) if config.train.task else text_data_dir(data, config)


def _looped_rules(config: Config) -> list:
    m, d, t = config.model, config.diffusion, config.train
    objective = t.objective
    drafting = m.draft_width > 1 or t.anchor_weight > 0
    return [
        (objective != "diffusion" or config.recurrence == "position"
         or not (drafting or d.self_condition or d.rollout_fraction or d.train_grid_fraction or d.likelihood_logits),
         "draft_width, anchor_weight, self_condition, rollout_fraction, train_grid_fraction and likelihood_logits "
         "are per-position remedies; recurrence=sequence (sequence-joint DiffusionBlocks) does not support them"),
        (not _joint(config) or d.solver in ("euler", "ancestral"),
         f"sequence-joint DiffusionBlocks samples with solver euler or ancestral, not {d.solver!r}"),
        (_joint(config) or not (d.position_sigma_fraction or d.wavefront or d.wavefront_sigma_fraction
                                 or d.clean_context_fraction),
         "position_sigma_fraction, wavefront, wavefront_sigma_fraction and clean_context_fraction belong to "
         "sequence-joint DiffusionBlocks (objective=diffusion with recurrence=sequence)"),
        (d.state_input == "unit" or _joint(config),
         "state_input belongs to sequence-joint DiffusionBlocks (objective=diffusion with recurrence=sequence)"),
        (not d.clean_prompt or _joint(config),
         "clean_prompt belongs to sequence-joint DiffusionBlocks (objective=diffusion with recurrence=sequence)"),
        (objective != "ouro" or config.recurrence == "sequence",
         "objective=ouro trains the exit gate of the sequence-recurrent model; use recurrence=sequence (or auto)"),
        (not drafting or objective == "diffusion",
         f"draft_width and anchor_weight belong to objective=diffusion, not {objective!r}"),
        (not drafting or not (d.self_condition or d.rollout_fraction or t.task),
         "self_condition, rollout_fraction and task runs are not supported with draft_width > 1 or anchor_weight > 0"),
    ]


# -- stacked -----------------------------------------------------------------------------------------
def build_stacked(config: Config, held_blocks=None) -> StackedLM:
    """The stacked family's model; parameters this run does not train are frozen
    (requires_grad False), so the optimizer holds no state for them. ``held_blocks``:
    see StackedLM (the others are not even allocated)."""
    train = config.train
    model = StackedLM(config.model, config.diffusion, chained=train.objective == "dense",
                      checkpointing=train.checkpointing, held_blocks=held_blocks)
    if train.objective == "diffusion" and train.train_blocks:
        for index in set(range(config.model.num_blocks)) - set(train.train_blocks):
            model.blocks[index].requires_grad_(False)
    if not train.train_shared:
        for parameter in model.shared_parameters():
            parameter.requires_grad_(False)
    return model


def _stacked_objective(config: Config):
    train = config.train
    return DenseObjective() if train.objective == "dense" else StackedDiffusionObjective(train.train_blocks)


def _stacked_refusal(config: Config) -> str | None:
    return None if config.train.objective == "diffusion" else BLOCK_PARALLEL_HELP


def _own_blocks(config: Config, blocks: tuple[int, ...]) -> Config:
    """Block-parallel: the config of a process that trains its own blocks only."""
    own = copy.deepcopy(config)
    own.train.train_blocks = blocks
    return own


def _stacked_blocks(config: Config, blocks: tuple[int, ...]) -> StackedLM:
    """Block-parallel: this process allocates (and trains) its own blocks only."""
    return build_stacked(_own_blocks(config, blocks), held_blocks=blocks)


def _stacked_blocks_objective(config: Config, blocks: tuple[int, ...]):
    return _stacked_objective(_own_blocks(config, blocks))


def _stacked_after_optimizer(model, optimizer, device, distributed: bool) -> None:
    # one process training every block on a GPU: inactive blocks' weights and AdamW state wait in host memory
    if device.type == "cuda" and not model.chained and not distributed:
        model.offload = HostOffload(model, optimizer, device)


def _diffusion_or_dense(config: Config) -> list:
    m, d, t = config.model, config.diffusion, config.train
    return [
        (not t.task, f"reasoning tasks (--task) train the looped family, not {m.family}"),
        (t.objective in ("diffusion", "dense"),
         f"the {m.family} family trains with objective diffusion or dense, not {t.objective!r}"),
        (not (d.self_condition or d.rollout_fraction or d.train_grid_fraction or d.likelihood_logits),
         "self_condition, rollout_fraction, train_grid_fraction and likelihood_logits are looped-model remedies; "
         f"the {m.family} family does not support them"),
        (m.draft_width == 1 and t.anchor_weight == 0,
         f"draft_width and anchor_weight are looped-model keys; the {m.family} family does not support them"),
    ]


# -- masked diffusion ---------------------------------------------------------------------------------
def _build_masked(config: Config) -> MaskedDiffusionLM:
    return MaskedDiffusionLM(config.model, config.diffusion, blockwise=config.train.objective == "diffusion")


def _masked_objective(config: Config):
    return make_masked_objective(config.train.objective)


LOOPED = Family(build=_build_looped, objective=_looped_objective, feed=_looped_feed, data_dir=_looped_data_dir,
                rules=_looped_rules,
                trains_every_parameter=lambda config: config.train.objective != "dense")  # dense skips the denoiser
STACKED = Family(build=build_stacked, objective=_stacked_objective, feed=TextFeed, data_dir=text_data_dir,
                 rules=_diffusion_or_dense, block_parallel_refusal=_stacked_refusal, build_for_blocks=_stacked_blocks,
                 objective_for_blocks=_stacked_blocks_objective, after_optimizer=_stacked_after_optimizer)
MASKED = Family(build=_build_masked, objective=_masked_objective, feed=MaskedTextFeed, data_dir=text_data_dir,
                rules=_diffusion_or_dense, commands="masked", trains_every_parameter=dense_trains_every_parameter)
