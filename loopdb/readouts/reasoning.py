"""Accuracy on a reasoning task (loopdb.tasks) at a loop count, per difficulty, with an optional
adaptive exit (loopdb.maths.exit): an example is right when every token of its final answer is the
argmax of the model's predictive distribution at the position that answers it (for one-token
answers: what greedy generation after the prompt produces)."""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..maths.exit import ExitRule, ExitTracker
from ..tasks import final_answer_positions, training_arrays
from ..sampling import JOINT, RECURRENT, sampler_of
from .scoring import initial_noise, predictive_core

VAL_SEED, TEST_SEED = 999, 1000  # evaluation examples; the shipped lm-eval sets (eval/tasks/reasoning) use 1000
SPLIT_SEEDS = {"val": VAL_SEED, "test": TEST_SEED}


def within_training(difficulty: int, train_config) -> bool:
    """Up to the largest trained difficulty: a task that supervises every prefix (s3, s5, hops)
    trains all shorter ones too. Beyond it: extrapolation."""
    return difficulty <= max(train_config.train_difficulties)


def evaluation_difficulties(train_config) -> tuple[int, ...]:
    """The difficulties scored: ``test_difficulties``, or the trained ones and on to twice the largest."""
    if train_config.test_difficulties:
        return tuple(train_config.test_difficulties)
    trained = tuple(train_config.train_difficulties)
    return tuple(sorted(set(trained) | set(range(max(trained) + 1, 2 * max(trained) + 1))))


def evaluation_examples(task, split: str, difficulties, count: int) -> list:
    return [example for difficulty in difficulties for example in task.generate(SPLIT_SEEDS[split], difficulty, count)]


@torch.no_grad()
def loop_with_exit(model, context, state: torch.Tensor, max_loops: int, rule: ExitRule | None):
    """Up to ``max_loops`` loops of a recurrent model (objective bptt or ouro) with per-position exit;
    an exited position keeps its state. Returns (logits of the final states, loops used (B, T))."""
    if sampler_of(model) is not RECURRENT:
        raise UsageError("adaptive exit needs a recurrent model (objective bptt or ouro); "
                         f"this one loops as {model.loop}")
    tracker = ExitTracker(rule, state.shape[:2], state.device)
    for _ in range(max_loops):
        new_state = model.recur(state, context)
        logits = model.readout(new_state, context) if tracker.needs_logits else None
        gate = model.exit_probability(new_state) if tracker.needs_gate else None
        state, old_state = torch.where(tracker.active[..., None], new_state, state), state
        tracker.update(old_state, state, logits, gate)
        if tracker.done:
            break
    return model.readout(state, context), tracker.loops_used


@torch.no_grad()
def task_accuracy(model, task, examples, num_loops: int, samples: int = 1, seed: int = 0,
                  exit_rule: ExitRule | None = None, batch_size: int = 256, device="cpu") -> dict:
    """{"accuracy", "by_difficulty": {difficulty: accuracy}, "mean_loops"} over ``examples``.
    Without an exit the answer is the argmax of the predictive readout (``samples`` draws of the
    initial state); with one, of a single draw, and mean_loops is the loops the answers used."""
    generator = torch.Generator().manual_seed(seed)
    start_token = getattr(model.config, "start_token", False)
    correct, loops_used = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs, targets = (tensor.to(device) for tensor in training_arrays(task, chunk, start_token=start_token))
        context = model.encode(inputs)
        shape = (*inputs.shape, model.config.d_model)
        if exit_rule is None:
            log_probs = predictive_core(model, context, num_loops, samples,
                                        lambda: initial_noise(model, shape, num_loops, generator, device), generator)
            used = torch.full(inputs.shape, num_loops)
        else:
            state = initial_noise(model, shape, num_loops, generator, device)
            log_probs, used = loop_with_exit(model, context, state, num_loops, exit_rule)
        predicted = log_probs.argmax(-1)
        for row, positions in enumerate(final_answer_positions(task, chunk, start_token)):
            correct.append(bool((predicted[row, positions] == targets[row, positions]).all()))
            loops_used.append(float(used[row, positions].float().mean()))
    by_difficulty = {}
    for example, ok in zip(examples, correct):
        by_difficulty.setdefault(example.difficulty, []).append(ok)
    return {"accuracy": sum(correct) / len(correct),
            "by_difficulty": {d: sum(oks) / len(oks) for d, oks in sorted(by_difficulty.items())},
            "mean_loops": sum(loops_used) / len(loops_used)}


@torch.no_grad()
def step_accuracy(model, task, examples, seed: int = 0, batch_size: int = 256, device="cpu") -> dict:
    """How well ONE denoiser call of a sequence-joint model resolves an answer whose earlier answers
    are already resolved: for the m-th answer of every example, the answers before it sit at their
    clean targets at the last sigma, it and the later ones at sigma_max noise, and it is right when
    its argmax is its target. This is the step the wavefront sampler repeats, one answer at a time;
    a model low here cannot chain its answers with any loop count, however it was trained.
    {"mean": over all answers, "by_answer": [accuracy of the 1st, 2nd, ... answer], "chained": the
    final-answer accuracy when the answers are resolved that way from the model's OWN earlier ones,
    each committed at its argmax: one call per answer, in order, the errors compounding as in any
    sampler, so a sampler's accuracy well below it is lost in the sampler, not in the step}."""
    if sampler_of(model) is not JOINT or model.targets_are_next_tokens:
        raise UsageError("step accuracy reads a sequence-joint DiffusionBlocks model on a reasoning task "
                         "(objective=diffusion, recurrence=sequence, a task run)")
    generator = torch.Generator().manual_seed(seed)
    right, counts, chained = {}, {}, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs, targets = (tensor.to(device) for tensor in
                           training_arrays(task, chunk, start_token=getattr(model.config, "start_token", False)))
        context = model.encode(inputs)
        scored = targets >= 0
        order = scored.long().cumsum(1) - 1  # the m-th answer of its row has order m
        table = model.target_table()
        own = torch.zeros_like(targets)  # the chained answers: each from the model's own earlier ones
        for m in range(int(scored.sum(1).max())):
            resolved = scored & (order < m)
            asked = scored & (order == m)
            noise = initial_noise(model, (*inputs.shape, model.config.d_model), 1, generator, device)
            sigma = torch.where(resolved, model.sigma_last, model.schedule.sigma_max)

            def answer(earlier):  # the argmax of every position, the answers before m given as ``earlier``
                z = torch.where(resolved[..., None], table[earlier.clamp(min=0)].to(noise.dtype), noise)
                return model.denoise(z, sigma, context).argmax(-1)

            right[m] = right.get(m, 0) + int((answer(targets) == targets)[asked].sum())
            own = torch.where(asked, answer(own), own)
            counts[m] = counts.get(m, 0) + int(asked.sum())
        last = torch.where(scored, order, -1).argmax(1)  # each row's final answer
        rows = torch.arange(len(chunk), device=targets.device)
        chained += int((own[rows, last] == targets[rows, last]).sum())
    by_answer = [right[m] / counts[m] for m in sorted(counts)]
    return {"mean": sum(right.values()) / sum(counts.values()), "by_answer": by_answer,
            "chained": chained / len(examples)}
