"""Generation with a KV cache, early exit per token, and self-speculative decoding.

A model is driven one layer at a time through the small LayerwiseDecoder protocol below,
so ease's transformers and the Hugging Face adapter (ease.hf) share this module.

Early exit (CALM, Schuster et al. 2022): after each exit layer the criterion scores the
token; once the score reaches the threshold the token is emitted from that exit and the
deeper layers are skipped at its position. Later tokens still attend to that position in
the skipped layers, so their keys/values must come from somewhere:
  "propagate"  CALM's state propagation: project the exited hidden state into every
               skipped layer's keys/values (a K/V projection per layer, no attention/FFN).
  "recompute"  lazy: keep the exited hidden state; when a later token needs a deeper
               layer, run the skipped positions through it first, batched with that token.
               The cache then holds exactly what the full model would have computed.
Rows of a batch exit independently: deeper layers run only on the rows still going.

Self-speculative decoding (LayerSkip, Elhoushi et al. 2024): draft k tokens with layers
1..E and the exit after E, then run layers E+1..L once over the k drafted positions,
reusing the draft's hidden states and layer 1..E cache, and keep the longest prefix the
full model agrees with plus its own next token. The output equals full greedy decoding.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from .exits import get_criterion

KV_FILLS = ("propagate", "recompute")


class LayerwiseDecoder(Protocol):
    """What generation needs from a model. Layers are 1-indexed.

    `positions` is an (R, n) LongTensor: the position of each of the n new entries of the
    R rows being run (rows of the batch may sit at different positions). -1 marks padding:
    an entry that is computed but whose keys/values are neither stored nor seen, used when
    some rows need fewer entries than others. Hidden states are (R, n, dim).
    """

    num_layers: int
    exit_layers: tuple[int, ...]  # layers with an exit; num_layers is always one
    max_seq_len: int
    kv_fill_cost: float  # cost of fill_kv relative to layer_step, for compute accounting

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input hidden states of tokens (R, n) at positions (R, n)."""

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for batch_size rows of up to max_len positions."""

    def layer_step(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """Run block `layer` on h and store its keys/values for `positions` in the cache.
        Each entry attends as KVCache describes; returns the block's output."""

    def fill_kv(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> None:
        """Store the keys/values block `layer` would compute from input h, without running
        its attention or FFN (CALM's state propagation)."""

    def exit_logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the exit after `layer` for its hidden state h (..., dim)."""


class KVCache:
    """Every layer's keys and values in slots by position, (batch, heads, max_len, head_dim),
    allocated at the first write. `select(rows)` is a view on some rows of the batch.

    A new entry at position q attends to its row's slots at positions < q that the same
    call does not rewrite, and to the call's entries at positions <= q. Slots at or past a
    query's position are never read, so a rollback (rejected speculative tokens) costs
    nothing: later writes overwrite them. The caller keeps the rest valid: before an entry
    at position q runs layer l, every position < q holds layer l's keys/values or is among
    the call's new entries.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.batch_size, self.max_len = batch_size, max_len
        self.rows: torch.Tensor | None = None  # None: every row, in order

    @classmethod
    def for_model(cls, model: LayerwiseDecoder, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `model`, refusing positions past its max_seq_len."""
        if max_len > model.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions is longer than max_seq_len="
                             f"{model.max_seq_len}")
        return cls(model.num_layers, batch_size, max_len)

    def select(self, rows: torch.Tensor) -> KVCache:
        view = copy.copy(self)  # shares the per-layer lists, so writes reach the original
        view.rows = rows if self.rows is None else self.rows[rows]
        return view

    def context(self, layer: int, positions: torch.Tensor):
        """(past keys, past values) or None, and a boolean mask (R, 1, n, past + n) or None
        when plain causal attention after the past is right."""
        keys, values = self.keys[layer - 1], self.values[layer - 1]
        start = _shared_run(positions)
        if start is not None:
            if keys is None or start == 0:
                return None, None
            return (self._rows(keys[:, :, :start]), self._rows(values[:, :, :start])), None
        steps = positions.shape[1]
        real = positions >= 0
        # Causal among the new entries. Padding sees only itself: a query that sees nothing
        # is NaN in some attention kernels, and a NaN value poisons its row's other queries.
        mask = (positions[:, None, :] <= positions[:, :, None]) & real[:, None, :]
        mask |= torch.eye(steps, dtype=torch.bool, device=positions.device)
        past = int(positions.max())
        if keys is None or past == 0:
            return None, mask[:, None]
        rewritten = torch.zeros(len(positions), past + 1, dtype=torch.bool, device=positions.device)
        rewritten.scatter_(1, torch.where(real, positions, past), True)
        slots = torch.arange(past, device=positions.device)
        past_mask = (slots < positions[:, :, None]) & ~rewritten[:, None, :past]
        return ((self._rows(keys[:, :, :past]), self._rows(values[:, :, :past])),
                torch.cat([past_mask, mask], dim=-1)[:, None])

    def write(self, layer: int, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store keys/values (R, heads, n, head_dim) of the entries at positions (R, n)."""
        if self.keys[layer - 1] is None:
            shape = (self.batch_size, keys.shape[1], self.max_len, keys.shape[3])
            self.keys[layer - 1] = keys.new_zeros(shape)
            self.values[layer - 1] = values.new_zeros(shape)
        start = _shared_run(positions)
        if start is not None and self.rows is None:
            end = start + positions.shape[1]
            self.keys[layer - 1][:, :, start:end] = keys
            self.values[layer - 1][:, :, start:end] = values
            return
        real = positions >= 0
        rows = self.rows if self.rows is not None else torch.arange(len(positions),
                                                                     device=positions.device)
        rows = rows[:, None].expand_as(positions)[real]
        slots = positions[real]
        self.keys[layer - 1][rows, :, slots] = keys.transpose(1, 2)[real]
        self.values[layer - 1][rows, :, slots] = values.transpose(1, 2)[real]

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor.index_select(0, self.rows)


def _shared_run(positions: torch.Tensor) -> int | None:
    """start when every row's positions are start, start+1, ..., else None."""
    start = int(positions[0, 0])
    run = torch.arange(start, start + positions.shape[1], device=positions.device)
    return start if start >= 0 and bool((positions == run).all()) else None


# -- results -----------------------------------------------------------------------------

def best_time(run, repeats: int = 3):
    """(result, seconds): run() once to warm up (first calls pay one-off costs), then the
    fastest of `repeats` timed calls, the least disturbed by whatever else the machine does."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats} must be >= 1")
    run()
    best, result = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return result, best


@dataclass
class GenerationResult:
    """Generated tokens with where each came from and what it cost.

    exit_layers[b, i]: the layer whose exit produced new token i of row b (0: not
    generated, the row had ended at eos). layers_computed[b, i]: blocks run at the
    position that produced it, K/V fills counted at kv_fill_cost each, recomputed layers
    counted where they ran; self-speculative rounds share their cost among the tokens
    they emit. drafted/accepted: self-speculative draft tokens checked / kept.
    """

    tokens: torch.Tensor  # (B, prompt_length + max_new_tokens); after eos, eos again
    prompt_length: int
    num_layers: int
    exit_layers: torch.Tensor  # (B, max_new_tokens) long
    layers_computed: torch.Tensor  # (B, max_new_tokens) float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # self-speculative draft/verify rounds (summed over rows)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]

    @property
    def generated(self) -> torch.Tensor:
        return self.exit_layers > 0

    @property
    def num_generated(self) -> int:
        return int(self.generated.sum())

    @property
    def mean_exit_layer(self) -> float:
        return self.exit_layers[self.generated].double().mean().item()

    @property
    def mean_layers_computed(self) -> float:
        return self.layers_computed[self.generated].double().mean().item()

    @property
    def theoretical_speedup(self) -> float:
        """Speedup over full decoding if time were proportional to layers computed."""
        return self.num_layers / self.mean_layers_computed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_round(self) -> float:
        return self.num_generated / self.rounds if self.rounds else math.nan


def tokens_by_depth(result: GenerationResult, tokenizer, row: int = 0):
    """[(text, exit layer), ...] for one row, prompt tokens with layer None: the data for
    text coloured by depth. The texts concatenate to tokenizer.decode(the row's ids)."""
    if not 0 <= row < len(result.tokens):
        raise ValueError(f"row {row} is out of range for a batch of {len(result.tokens)}")
    count = result.prompt_length + int(result.generated[row].sum())
    ids = result.tokens[row, :count].tolist()
    layers = [None] * result.prompt_length + result.exit_layers[row].tolist()
    pieces, previous = [], ""
    for i in range(count):
        text = tokenizer.decode(ids[:i + 1])
        # Decoding prefixes keeps what joining adds between tokens (spaces, line breaks).
        pieces.append((text[len(previous):], layers[i]))
        previous = text
    return pieces


# -- decoding state ----------------------------------------------------------------------

class _Decoding:
    """Tokens, cache and per-token records of one generate call."""

    def __init__(self, model, input_ids, max_new_tokens: int, eos_token_id: int | None):
        self.model, self.eos = model, eos_token_id
        batch, self.prompt_length = input_ids.shape
        device = input_ids.device
        self.tokens = torch.cat([input_ids, input_ids.new_zeros(batch, max_new_tokens)], dim=1)
        self.exit_layers = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.layers_computed = torch.zeros(batch, max_new_tokens, dtype=torch.float64,
                                           device=device)
        self.emitted = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.max_new_tokens = max_new_tokens
        self.cache = model.new_cache(batch, self.tokens.shape[1])
        self.all_rows = torch.arange(batch, device=device)
        self.prefill()

    def prefill(self) -> None:
        """Every layer for prompt positions 0..T-2; the last prompt token is the first step."""
        steps = self.prompt_length - 1
        if steps == 0:
            return
        positions = torch.arange(steps, device=self.tokens.device).expand(len(self.tokens), -1)
        h = self.model.embed(self.tokens[:, :steps], positions)
        for layer in range(1, self.model.num_layers + 1):
            h = self.model.layer_step(layer, h, positions, self.cache)

    def active_rows(self) -> torch.Tensor:
        return (~self.finished & (self.emitted < self.max_new_tokens)).nonzero().squeeze(1)

    def view(self, rows: torch.Tensor) -> KVCache:
        return self.cache if len(rows) == len(self.all_rows) else self.cache.select(rows)

    def emit(self, rows, new_tokens, exit_layers, layers_computed, counts=None) -> None:
        """Append the first counts[r] (default: all) of new_tokens (R, m) to each row;
        a row stops after eos."""
        offsets = torch.arange(new_tokens.shape[1], device=rows.device)
        index = self.emitted[rows, None] + offsets
        keep = torch.ones_like(new_tokens, dtype=torch.bool) if counts is None \
            else offsets < counts[:, None]
        if self.eos is not None:
            is_eos = (new_tokens == self.eos) & keep
            keep &= (is_eos.cumsum(1) - is_eos.long()) == 0  # nothing after the first eos
            self.finished[rows] |= is_eos.any(1)
        r, c = keep.nonzero(as_tuple=True)
        self.tokens[rows[r], self.prompt_length + index[r, c]] = new_tokens[r, c]
        self.exit_layers[rows[r], index[r, c]] = exit_layers[r, c]
        self.layers_computed[rows[r], index[r, c]] += layers_computed[r, c]
        self.emitted[rows] += keep.sum(1)

    def result(self, **stats) -> GenerationResult:
        if self.eos is not None:  # rows that ended early read eos to the end
            pad = self.exit_layers == 0
            self.tokens[:, self.prompt_length:][pad] = self.eos
        return GenerationResult(self.tokens, self.prompt_length, self.model.num_layers,
                                self.exit_layers, self.layers_computed.float(), **stats)


# -- early-exit generation ---------------------------------------------------------------

@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0,
             seed: int | torch.Generator = 0, threshold: float = 0.0,
             criterion="max_prob", exit_layers=None, kv_fill: str = "propagate",
             eos_token_id: int | None = None) -> GenerationResult:
    """Generate max_new_tokens after input_ids (T,) or (B, T) with a KV cache.

    temperature 0 is greedy; above 0, sampling from the top_k tokens / top_p nucleus,
    reproducible from seed (an int or a torch.Generator). Each token leaves at the first
    of exit_layers (default: the model's) whose criterion score is >= threshold; 0 turns
    early exit off. kv_fill says how the skipped layers get the exited position's
    keys/values: "propagate" or "recompute" (see the module docstring). A row that emits
    eos_token_id stops; its remaining tokens read eos.
    """
    input_ids = _check_prompt(model, input_ids, max_new_tokens)
    threshold = _check_threshold(threshold)
    if kv_fill not in KV_FILLS:
        raise ValueError(f"kv_fill = {kv_fill!r}; choose from {KV_FILLS}")
    sample = _sampler(temperature, top_k, top_p, seed, input_ids.device)
    early = [layer for layer in _check_exit_layers(model, exit_layers) if layer < model.num_layers]
    criterion = get_criterion(criterion)
    run = _Decoding(model, input_ids, max_new_tokens, eos_token_id)
    skipped = _Propagate(run) if kv_fill == "propagate" else _Recompute(run)
    while len(rows := run.active_rows()):
        logits, exit_at, computed = _early_exit_step(
            run, rows, early if threshold > 0 else [], threshold, criterion, skipped)
        run.emit(rows, sample(logits)[:, None], exit_at[:, None], computed[:, None])
    return run.result()


def _early_exit_step(run: _Decoding, rows, early_exits, threshold, criterion, skipped):
    """One new token for each row: logits (R, V), exit layer (R,), layers computed (R,)."""
    model = run.model
    position = run.prompt_length - 1 + int(run.emitted[rows[0]])  # rows advance together
    going = torch.arange(len(rows), device=rows.device)  # rows still running, by index
    positions = torch.full((len(rows), 1), position, device=rows.device)
    h = model.embed(run.tokens[rows, position, None], positions)
    exit_at = torch.full((len(rows),), model.num_layers, device=rows.device)
    computed = torch.zeros(len(rows), dtype=torch.float64, device=rows.device)
    logits, state = None, criterion.init_state()
    for layer in range(1, model.num_layers + 1):
        h = skipped.layer_step(layer, h, rows[going], positions[going])
        computed[going] += 1
        if layer not in early_exits:
            continue
        exit_logits = model.exit_logits(h[:, 0], layer)
        score, state = criterion.step(exit_logits, h[:, 0], state)
        leave = score >= threshold
        if not leave.any():
            continue
        if logits is None:
            logits = exit_logits.new_empty(len(rows), exit_logits.shape[-1])
        out = leave.nonzero().squeeze(1)
        logits[going[out]] = exit_logits[out]
        exit_at[going[out]] = layer
        computed[going[out]] += skipped.skip(layer, h[out], rows[going[out]], positions[going[out]])
        stay = (~leave).nonzero().squeeze(1)
        h, going, state = h[stay], going[stay], _select_rows(state, stay)
        if not len(going):
            return logits, exit_at, computed
    final = model.exit_logits(h[:, 0], model.num_layers)
    if logits is None:
        return final, exit_at, computed
    logits[going] = final
    return logits, exit_at, computed


class _Propagate:
    """CALM's state propagation: skipped layers get K/V projected from the exit's state."""

    def __init__(self, run: _Decoding):
        self.run, self.fill_cost = run, run.model.kv_fill_cost

    def layer_step(self, layer, h, rows, positions):
        return self.run.model.layer_step(layer, h, positions, self.run.view(rows))

    def skip(self, layer, h, rows, positions) -> float:
        model, cache = self.run.model, self.run.view(rows)
        for deeper in range(layer + 1, model.num_layers + 1):
            model.fill_kv(deeper, h, positions, cache)
        return self.fill_cost * (model.num_layers - layer)


class _Recompute:
    """Lazy: an exited position keeps its hidden state and depth; a later token that runs
    a layer first brings every position it attends to, but that lacks the layer, through
    it, in the same call."""

    def __init__(self, run: _Decoding):
        self.run = run
        batch, max_len = run.tokens.shape
        self.depth = torch.full((batch, max_len), run.model.num_layers, device=run.tokens.device)
        self.hidden: torch.Tensor | None = None  # (batch, max_len, dim) once a token exits

    def skip(self, layer, h, rows, positions) -> float:
        if self.hidden is None:
            batch, max_len = self.depth.shape
            self.hidden = h.new_zeros(batch, max_len, h.shape[-1])
        self.hidden[rows, positions[:, 0]] = h[:, 0]
        self.depth[rows, positions[:, 0]] = layer
        return 0.0

    def layer_step(self, layer, h, rows, positions):
        run = self.run
        position = int(positions[0, 0])
        # Every earlier position has depth >= layer - 1: each call brings them one deeper.
        pending = self.depth[rows, :position] < layer
        count = int(pending.sum(1).max()) if position else 0
        if count == 0:
            return run.model.layer_step(layer, h, positions, run.view(rows))
        slots = torch.arange(position, device=h.device)
        lagging = torch.where(pending, slots, position).sort(dim=1).values[:, :count]
        real = lagging < position
        catch_up = torch.where(real, lagging, -1)
        x = torch.cat([self.hidden[rows[:, None], lagging.clamp(max=position - 1)], h], dim=1)
        out = run.model.layer_step(layer, x, torch.cat([catch_up, positions], dim=1),
                                   run.view(rows))
        r, c = real.nonzero(as_tuple=True)
        self.hidden[rows[r], lagging[r, c]] = out[r, c]
        self.depth[rows[r], lagging[r, c]] = layer
        run.layers_computed[rows[r], lagging[r, c] - (run.prompt_length - 1)] += 1
        return out[:, -1:]


def _select_rows(state, keep: torch.Tensor):
    """A criterion's state for the rows in `keep`: tensors (and tuples/dicts of them) per
    row are indexed, anything else (None, a layer counter) is shared by all rows."""
    if isinstance(state, torch.Tensor) and state.ndim:
        return state[keep]
    if isinstance(state, (tuple, list)):
        return type(state)(_select_rows(part, keep) for part in state)
    if isinstance(state, dict):
        return {key: _select_rows(part, keep) for key, part in state.items()}
    return state


# -- self-speculative decoding -----------------------------------------------------------

@torch.no_grad()
def generate_self_speculative(model, input_ids, max_new_tokens: int, *, draft_layer: int,
                              num_draft_tokens: int = 4,
                              eos_token_id: int | None = None) -> GenerationResult:
    """Greedy decoding with LayerSkip's self-speculation; the tokens equal full greedy
    decoding. Each round drafts num_draft_tokens with layers 1..draft_layer and that
    layer's exit, verifies them with layers draft_layer+1..L in one pass, and keeps the
    agreed prefix plus the full model's next token. Rows of a batch advance independently.
    exit_layers reads draft_layer for accepted drafts and num_layers for the full model's
    own tokens; layers_computed shares each round's draft and verify layers among the
    tokens it emits.
    """
    input_ids = _check_prompt(model, input_ids, max_new_tokens)
    _check_exit_layers(model, [draft_layer])
    if draft_layer >= model.num_layers:
        raise ValueError(f"draft_layer = {draft_layer} must be below num_layers="
                         f"{model.num_layers}: the draft needs layers left to verify with")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    run = _Decoding(model, input_ids, max_new_tokens, eos_token_id)
    num_layers, drafted, accepted, rounds = model.num_layers, 0, 0, 0
    while len(rows := run.active_rows()):
        cache = run.view(rows)
        budget = run.max_new_tokens - run.emitted[rows]
        draft_len = min(num_draft_tokens, int(budget.max()))
        offsets = torch.arange(draft_len, device=rows.device)
        useful = offsets < budget[:, None]  # drafts past a row's budget are padding
        start = run.prompt_length - 1 + run.emitted[rows]
        positions = torch.where(useful, start[:, None] + offsets, -1)
        token = run.tokens[rows, start]
        draft, hidden = [], []
        for i in range(draft_len):
            h = model.embed(token[:, None], positions[:, i, None].clamp(min=0))
            for layer in range(1, draft_layer + 1):
                h = model.layer_step(layer, h, positions[:, i, None], cache)
            hidden.append(h)
            token = model.exit_logits(h[:, 0], draft_layer).argmax(-1)
            draft.append(token)
        draft, h = torch.stack(draft, dim=1), torch.cat(hidden, dim=1)
        for layer in range(draft_layer + 1, num_layers + 1):
            h = model.layer_step(layer, h, positions, cache)
        verified = model.exit_logits(h, num_layers).argmax(-1)
        agreed = ((draft == verified) & useful).long().cumprod(dim=1).sum(dim=1)
        checked = useful.sum(dim=1)
        kept = torch.minimum(agreed + 1, checked)  # the agreed drafts and the correction
        exit_layer = torch.where(offsets < agreed[:, None], draft_layer, num_layers)
        cost = (checked * num_layers / kept).double()[:, None].expand(-1, draft_len)
        run.emit(rows, verified, exit_layer, cost, counts=kept)
        drafted += int(checked.sum())
        accepted += int(agreed.sum())
        rounds += len(rows)
    return run.result(drafted=drafted, accepted=accepted, rounds=rounds)


# -- checks and sampling -----------------------------------------------------------------

def _check_prompt(model, input_ids, max_new_tokens) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a LongTensor, got {what}")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (T,) or (B, T) with B, T >= 1, got shape "
                         f"{tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    length = input_ids.shape[1] + max_new_tokens
    if length > model.max_seq_len:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens}"
                         f" = {length} tokens is longer than max_seq_len={model.max_seq_len}")
    return input_ids


def _check_threshold(threshold) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold = {threshold} is outside [0, 1]")
    return threshold


def _check_exit_layers(model, exit_layers) -> list[int]:
    if exit_layers is None:
        return sorted(model.exit_layers)
    for layer in exit_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) \
                or not 1 <= layer <= model.num_layers:
            raise ValueError(f"exit layer {layer!r} is out of range: the model has layers "
                             f"1..{model.num_layers} (1-indexed)")
    return sorted(set(exit_layers))


def _sampler(temperature, top_k, top_p, seed, device):
    """logits (R, V) -> token ids (R,): argmax at temperature 0, else a seeded sample."""
    if not temperature >= 0:
        raise ValueError(f"temperature = {temperature} must be >= 0")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p} is outside (0, 1]")
    if temperature == 0:
        return lambda logits: logits.argmax(dim=-1)
    if isinstance(seed, torch.Generator):
        generator = seed
    else:
        generator = torch.Generator(device=device).manual_seed(seed)

    def sample(logits):
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the ones before it already reach top_p (the first stays).
            drop = probs.cumsum(dim=-1) - probs >= top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)

    return sample
