"""Adaptive per-token exit from a loop (docs/method.md#adaptive-exit).

A rule is ``kind:threshold``:
  kl:EPS     Huginn: stop once KL(p_k || p_{k-1}) between successive next-token distributions < EPS;
  delta:EPS  Huginn: stop once the latent state's relative change ||s_k - s_{k-1}|| / ||s_k|| < EPS;
  gate:Q     Ouro: stop once the cumulative exit probability 1 - prod_j (1 - lambda_j) >= Q,
             lambda_j = sigmoid(gate(s_j)) the model's learned exit gate.
An ExitTracker follows every position of a batch through the loops; a position that stops keeps
its state from then on (the caller freezes it) and its loop count is what it used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

KINDS = ("kl", "delta", "gate")


@dataclass(frozen=True)
class ExitRule:
    kind: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"


def parse_exit(text: str | None) -> ExitRule | None:
    """``kl:5e-4`` -> ExitRule("kl", 5e-4); None or "" -> None (a fixed loop count)."""
    if not text:
        return None
    kind, _, value = str(text).partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if kind not in KINDS or not threshold > 0 or (kind == "gate" and threshold > 1):
        raise UsageError(f"--exit {text!r}: expected kl:EPS, delta:EPS (EPS > 0) or gate:Q (0 < Q <= 1), "
                         "e.g. --exit kl:5e-4")
    return ExitRule(kind, threshold)


class ExitTracker:
    """Which positions are still looping. ``update`` after each loop k (1-based) takes the states
    before and after it, and, as the rule needs, that loop's logits or exit probabilities."""

    def __init__(self, rule: ExitRule | None, shape, device):
        self.rule = rule
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.loops_used = torch.zeros(shape, dtype=torch.long, device=device)
        self._previous_log_probs = None
        self._survival = torch.ones(shape, device=device)  # gate: prod_j (1 - lambda_j)

    @property
    def needs_logits(self) -> bool:
        return self.rule is not None and self.rule.kind == "kl"

    @property
    def needs_gate(self) -> bool:
        return self.rule is not None and self.rule.kind == "gate"

    def update(self, old_state: torch.Tensor, new_state: torch.Tensor, logits=None, exit_probability=None) -> None:
        self.loops_used += self.active.long()
        if self.rule is None:
            return
        if self.rule.kind == "kl":
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if self._previous_log_probs is None:
                stop = torch.zeros_like(self.active)
            else:
                kl = (log_probs.exp() * (log_probs - self._previous_log_probs)).sum(-1)
                stop = kl < self.rule.threshold
            self._previous_log_probs = log_probs
        elif self.rule.kind == "delta":
            change = (new_state.float() - old_state.float()).norm(dim=-1)
            stop = change < self.rule.threshold * new_state.float().norm(dim=-1).clamp(min=1e-12)
        else:
            self._survival = self._survival * (1 - exit_probability.float())
            stop = (1 - self._survival) >= self.rule.threshold
        self.active &= ~stop

    @property
    def done(self) -> bool:
        return not bool(self.active.any())
