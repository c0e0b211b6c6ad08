"""Exit criteria: when may a token leave at an early exit?

A criterion scores each exit in order, layer by layer, so the same object serves the
all-layers evaluation (scores for every token at once) and incremental generation (one
layer at a time). A token exits at the first exit layer whose score is >= the threshold;
tokens that never pass go on to the last layer.
"""

from __future__ import annotations

import torch


class ExitCriterion:
    """Base class. `step` sees one exit's logits and hidden state, returns a score per
    token (higher = more confident) and the state handed to the next exit."""

    name: str = ""

    def init_state(self):
        return None

    def step(self, logits: torch.Tensor, hidden: torch.Tensor, state):
        raise NotImplementedError


class MaxProbability(ExitCriterion):
    """Max softmax probability (BranchyNet's confidence; the EASE seed's rule)."""

    name = "max_prob"

    def step(self, logits, hidden, state):
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1), state


CRITERIA: dict[str, type[ExitCriterion]] = {MaxProbability.name: MaxProbability}


def get_criterion(name: str | ExitCriterion, **params) -> ExitCriterion:
    if isinstance(name, ExitCriterion):
        return name
    if name not in CRITERIA:
        raise ValueError(f"unknown exit criterion {name!r}; choose from {sorted(CRITERIA)}")
    return CRITERIA[name](**params)


def route(scores: torch.Tensor, exit_layers, threshold: float, num_layers: int) -> torch.Tensor:
    """Exit layer per token.

    scores: (N, len(exit_layers)) criterion scores at each exit layer, in layer order.
    A token leaves at the first exit layer with score >= threshold; the rest run to
    num_layers. threshold 0 means early exit is off: every token runs all layers.
    """
    exit_layers = list(exit_layers)
    if scores.shape[-1] != len(exit_layers):
        raise ValueError(f"scores have {scores.shape[-1]} columns for exit layers {exit_layers}")
    exit_layer = torch.full(scores.shape[:-1], num_layers, dtype=torch.long, device=scores.device)
    if threshold <= 0:
        return exit_layer
    decided = torch.zeros(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    for column, layer in enumerate(exit_layers):
        if layer >= num_layers:
            break
        leaving = ~decided & (scores[..., column] >= threshold)
        exit_layer[leaving] = layer
        decided |= leaving
    return exit_layer
