"""Exit criteria: when may a token leave at an early exit?

A criterion scores each exit in order, layer by layer, so the same object serves the
all-layers evaluation (scores for every token at once) and incremental generation (one
layer at a time). A token exits at the first exit layer whose score is >= the threshold;
tokens that never pass go on to the last layer. Every score lies in [0, 1], higher meaning
more confident, so one threshold scale fits all criteria.

`step(logits, hidden, state)` takes one exit's logits (..., V) and hidden state (..., dim)
for any leading shape ((B, T) in evaluation, (B,) in generation) and returns a score of
shape (...) and the state for the next exit; `init_state()` starts a new token position.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from .io import atomic_path


class ExitCriterion:
    """Base class. `step` sees one exit's logits and hidden state, returns a score per
    token (higher = more confident) and the state handed to the next exit."""

    name: str = ""

    @classmethod
    def from_params(cls, **params) -> ExitCriterion:
        """Build from plain data (TrainingConfig.exit_criterion_params)."""
        return cls(**params)

    def init_state(self):
        return None

    def step(self, logits: torch.Tensor, hidden: torch.Tensor, state):
        raise NotImplementedError


class MaxProbability(ExitCriterion):
    """Max softmax probability (BranchyNet's confidence, Teerapittayanon et al. 2016;
    CALM's "softmax response"; the EASE seed's rule)."""

    name = "max_prob"

    def step(self, logits, hidden, state):
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1), state


class ProbabilityMargin(ExitCriterion):
    """Top-1 minus top-2 softmax probability (CALM's softmax response as used for
    decoding, Schuster et al. 2022): a token whose two best guesses tie is not confident
    however peaked the pair is."""

    name = "margin"

    def step(self, logits, hidden, state):
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1], state


class Entropy(ExitCriterion):
    """1 - H(p) / log V (DeeBERT's entropy rule, Xin et al. 2020, exits when H is low):
    1 for a one-hot prediction, 0 for the uniform one."""

    name = "entropy"

    def step(self, logits, hidden, state):
        return 1.0 - _normalised_entropy(logits.float()), state


class Patience(ExitCriterion):
    """Agreement of consecutive exits (PABEE, Zhou et al. 2020).

    The streak is the number of consecutive exits, ending at this one, whose argmax is
    the same token (1 at the first exit). The score is min(streak, patience) / patience:
    threshold 1 exits once `patience` consecutive exits agree, and threshold j / patience
    asks for j of them. PABEE's patience t (predictions unchanged t times) is patience=t+1.
    """

    name = "patience"

    def __init__(self, patience: int = 2):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.patience = patience

    def step(self, logits, hidden, state):
        pred = logits.argmax(dim=-1)
        if state is None:
            streak = torch.ones_like(pred)
        else:
            last_pred, last_streak = state
            streak = torch.where(pred == last_pred, last_streak + 1, torch.ones_like(pred))
        return streak.clamp(max=self.patience).float() / self.patience, (pred, streak)


class HiddenSaturation(ExitCriterion):
    """Cosine similarity of this exit's hidden state with the previous exit's (CALM's
    "hidden-state saturation", Schuster et al. 2022), clipped at 0. The first exit has
    nothing to compare with and scores 0, so it never exits on this criterion."""

    name = "saturation"

    def step(self, logits, hidden, state):
        hidden = hidden.float()
        if state is None:
            return hidden.new_zeros(hidden.shape[:-1]), hidden
        return F.cosine_similarity(hidden, state, dim=-1).clamp(min=0.0), hidden


class LearnedExitClassifier(ExitCriterion):
    """A small MLP that predicts whether an exit's argmax equals the final layer's
    (CALM's early-exit classifier, Schuster et al. 2022, trained on a frozen model as in
    its "consistency" setting). Features: the hidden state scaled to unit RMS (the
    residual stream grows with depth), max probability, 1 - normalised entropy, top-1/2
    margin and layer / num_layers. The score is the predicted probability of agreement.

    The state counts exits: `step` must be called at `exit_layers` in order, the layers
    it was trained for. Build one with `train_exit_classifier`; save()/load() keep it.
    """

    name = "learned"

    def __init__(self, dim: int, exit_layers, num_layers: int, hidden_dim: int = 64):
        exit_layers = sorted(exit_layers)
        if not exit_layers or exit_layers[0] < 1 or exit_layers[-1] >= num_layers:
            raise ValueError(
                f"exit_layers {exit_layers} must be early layers in 1..{num_layers - 1}")
        self.dim, self.exit_layers, self.num_layers = dim, exit_layers, num_layers
        self.hidden_dim = hidden_dim
        self.net = nn.Sequential(nn.Linear(dim + 4, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 1))

    @classmethod
    def from_params(cls, path: str | Path) -> LearnedExitClassifier:
        return cls.load(path)

    def init_state(self):
        return 0

    def features(self, logits: torch.Tensor, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        logits, hidden = logits.float(), hidden.float()
        top2 = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
        unit_rms = hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        scalars = [top2[..., 0], 1.0 - _normalised_entropy(logits), top2[..., 0] - top2[..., 1],
                   torch.full_like(top2[..., 0], layer / self.num_layers)]
        return torch.cat([unit_rms, torch.stack(scalars, dim=-1)], dim=-1)

    @torch.no_grad()
    def step(self, logits, hidden, state):
        if state >= len(self.exit_layers):
            if state == len(self.exit_layers):  # the last layer: its own prediction agrees
                return logits.new_ones(logits.shape[:-1], dtype=torch.float), state + 1
            raise ValueError(f"step called {state + 1} times; the classifier knows exits "
                             f"{self.exit_layers} and the last layer {self.num_layers}")
        self.net.to(hidden.device)
        features = self.features(logits, hidden, self.exit_layers[state])
        return torch.sigmoid(self.net(features).squeeze(-1)), state + 1

    def save(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors into `directory`, atomically."""
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            config = {"dim": self.dim, "exit_layers": self.exit_layers,
                      "num_layers": self.num_layers, "hidden_dim": self.hidden_dim}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_model(self.net, str(tmp / "model.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LearnedExitClassifier:
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"no config.json in {directory}: not a saved exit classifier")
        classifier = cls(**json.loads((directory / "config.json").read_text()))
        load_model(classifier.net, str(directory / "model.safetensors"))
        return classifier


def _normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / log V, in [0, 1]."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1) / math.log(logits.shape[-1])


def train_exit_classifier(model, batches, exit_layers=None, *, hidden_dim: int = 64,
                          epochs: int = 30, lr: float = 3e-3, batch_size: int = 1024,
                          seed: int = 0, device: str | torch.device = "cpu"
                          ) -> LearnedExitClassifier:
    """Fit a LearnedExitClassifier on `batches` with `model` frozen (it is only read).

    exit_layers: the early exits to score (default: every layer but the last). The label
    of a token at an exit is 1 when the exit's argmax equals the last layer's. Training is
    full-data Adam on binary cross-entropy, deterministic given `seed`; the global RNG is
    left untouched.
    """
    num_layers = model.num_layers
    exit_layers = sorted(set(exit_layers or range(1, num_layers)) - {num_layers})
    model.check_layers(exit_layers)
    if not exit_layers:
        raise ValueError(f"no early exit layer to learn: the model has {num_layers} layer(s)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = LearnedExitClassifier(model.config.dim, exit_layers, num_layers, hidden_dim)
    features, labels = _classifier_data(model, batches, classifier, device)
    net = classifier.net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), batch_size):
            rows = order[start:start + batch_size]
            logit = net(features[rows]).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logit, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.to("cpu")
    return classifier


@torch.no_grad()
def _classifier_data(model, batches, classifier: LearnedExitClassifier, device):
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for x, _ in batches:
            states = model.hidden_states(x.to(device))
            final = model.exit_logits(states[-1], model.num_layers).argmax(dim=-1)
            for layer in classifier.exit_layers:
                logits = model.exit_logits(states[layer - 1], layer)
                layer_features = classifier.features(logits, states[layer - 1], layer)
                features.append(layer_features.flatten(0, -2))
                labels.append((logits.argmax(dim=-1) == final).float().flatten())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("train_exit_classifier got no batches")
    return torch.cat(features), torch.cat(labels)


CRITERIA: dict[str, type[ExitCriterion]] = {
    cls.name: cls for cls in (MaxProbability, ProbabilityMargin, Entropy, Patience,
                              HiddenSaturation, LearnedExitClassifier)
}


def check_criterion_params(name: str, params: dict | None) -> None:
    """Raise a ValueError unless criterion `name` accepts the keyword arguments `params`
    (their values are checked when the criterion is built)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown exit criterion {name!r}; choose from {sorted(CRITERIA)}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise TypeError(f"exit criterion params must be a dict, got {type(params).__name__}")
    cls = CRITERIA[name]
    builds_with_init = cls.from_params.__func__ is ExitCriterion.from_params.__func__
    try:
        inspect.signature(cls if builds_with_init else cls.from_params).bind(**params)
    except TypeError as error:
        raise ValueError(
            f"exit criterion {name!r} does not take params {params}: {error}") from None


def get_criterion(name: str | ExitCriterion, **params) -> ExitCriterion:
    if isinstance(name, ExitCriterion):
        if params:
            raise ValueError(f"params {sorted(params)} given with a built criterion {name.name!r}")
        return name
    check_criterion_params(name, params)
    return CRITERIA[name].from_params(**params)


def route(scores: torch.Tensor, exit_layers, threshold, num_layers: int) -> torch.Tensor:
    """Exit layer per token.

    scores: (N, len(exit_layers)) criterion scores at each exit layer, in layer order.
    A token leaves at the first exit layer with score >= threshold; the rest run to
    num_layers. threshold 0 means early exit is off: every token runs all layers.
    threshold may be a float, giving (N,), or a 1-D tensor of K thresholds, giving (N, K).
    """
    exit_layers = list(exit_layers)
    if scores.shape[-1] != len(exit_layers):
        raise ValueError(f"scores have {scores.shape[-1]} columns for exit layers {exit_layers}")
    early = [column for column, layer in enumerate(exit_layers) if layer < num_layers]
    # Compare in the scores' precision: a stored float32 score of 0.9 passes threshold 0.9.
    dtype = scores.dtype if scores.is_floating_point() else torch.float64
    thresholds = torch.as_tensor(threshold, dtype=dtype, device=scores.device)
    if thresholds.dim() > 1:
        raise ValueError(f"threshold must be a float or a 1-D tensor, got shape {thresholds.shape}")
    # A token has left by exit j iff its best score so far passes: count the exits it fails.
    best_so_far = scores[..., early].to(dtype).nan_to_num(nan=-math.inf).cummax(dim=-1).values
    failed = (best_so_far[..., None] < thresholds.reshape(-1)).sum(dim=-2)  # (..., K)
    layers = torch.tensor([exit_layers[c] for c in early] + [num_layers], device=scores.device)
    exit_layer = torch.where(thresholds.reshape(-1) <= 0, num_layers, layers[failed])
    return exit_layer if thresholds.dim() else exit_layer.squeeze(-1)
