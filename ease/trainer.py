"""Trainer: the weighted multi-exit loss, per-layer learning rates, routed evaluation,
and fit() with atomic checkpoints and exact resume.

The trainer talks to a model through a small protocol, so our two transformers and the
Hugging Face adapter share one code path:
  model.config.vocab_size, model.num_layers, model.exit_layers,
  model.forward_exits(x, layers), model.hidden_states(x), model.exit_logits(h, layer),
  model.layer_modules()  -> {None: shared modules, 1: layer-1 modules, ...}

The same script runs data-parallel under `torchrun --nproc_per_node N`: the trainer joins
the process group (gloo on CPU, nccl on CUDA), each rank trains on its slice of every
batch through DistributedDataParallel, logged losses are averaged over ranks, every rank
evaluates the whole validation set (same weights, same numbers), and only rank 0 writes
checkpoints and calls on_epoch_end.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from .config import TrainingConfig
from .evaluation import LayerOutputs, collect_layer_outputs
from .io import atomic_path


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" picks cuda, then mps, then cpu."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class EpochStats:
    loss: float
    layer_losses: dict[int, float] = field(default_factory=dict)
    steps: int = 0


class Trainer:
    def __init__(self, config: TrainingConfig, vocab_size: int, device: str = "cpu",
                 progress: bool | None = None):
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.config = config
        self.vocab_size = vocab_size
        self.rank, self.world_size, self.device = _init_distributed(resolve_device(device))
        # EASE_PROGRESS=0 silences every bar, e.g. for batch runs and committed notebooks.
        if progress is None:
            progress = os.environ.get("EASE_PROGRESS", "1") != "0"
        self.progress = progress and self.rank == 0  # one bar, not one per rank
        self._ddp: _DistributedExits | None = None

    # -- checks ----------------------------------------------------------------------
    def check_model(self, model) -> None:
        if model.config.vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab mismatch: the model has vocab_size={model.config.vocab_size}, "
                f"the trainer was built with vocab_size={self.vocab_size}"
            )
        self.config.validate(model.num_layers, model.exit_layers)

    def _check_tokens(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for name, ids in (("x", x), ("y", y)):
            if ids.dtype != torch.long:
                raise TypeError(f"batch {name} must be a LongTensor, got {ids.dtype}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise ValueError(
                    f"batch {name} has token id {bad} outside the vocabulary [0, {self.vocab_size})"
                )

    # -- loss ------------------------------------------------------------------------
    def compute_loss(self, model, x: torch.Tensor, y: torch.Tensor):
        """sum_l w_l * CE_l over the exits with w_l > 0, and {layer: CE_l}.

        The weights are used as given, not renormalised: the loss scale is the user's
        choice. Exits with weight 0 are never computed, and the backbone stops at the
        deepest weighted layer.
        """
        self._check_tokens(x, y)
        x, y = x.to(self.device), y.to(self.device)
        weights = {layer: w for layer, w in self.config.layer_weights.items() if w > 0}
        logits = model.forward_exits(x, list(weights))
        layer_losses = {
            layer: F.cross_entropy(out.float().flatten(0, 1), y.flatten())
            for layer, out in logits.items()
        }
        loss = sum(weights[layer] * ce for layer, ce in layer_losses.items())
        return loss, layer_losses

    # -- optimiser -------------------------------------------------------------------
    def create_optimizer(self, model, base_lr: float, weight_decay: float = 0.1,
                         betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with one named group per layer at base_lr * layer_lr_scales[l].

        Shared parts (embeddings, final norm, LM head) train at base_lr. Norm weights and
        biases (1-D tensors) get no weight decay, each in a "<name>/no_decay" group.
        """
        if not base_lr > 0:
            raise ValueError(f"base_lr = {base_lr} must be > 0")
        self.check_model(model)
        groups, seen = [], set()
        for layer, modules in model.layer_modules().items():
            name = "shared" if layer is None else f"layer_{layer}"
            lr = base_lr * (1.0 if layer is None else self.config.lr_scale(layer))
            decay, no_decay = [], []
            for module in modules:
                for param in module.parameters():
                    if id(param) in seen or not param.requires_grad:
                        continue  # a tied weight belongs to its first owner
                    seen.add(id(param))
                    (decay if param.ndim >= 2 else no_decay).append(param)
            for suffix, params, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
                if params:
                    groups.append({"name": name + suffix, "params": params, "lr": lr,
                                   "weight_decay": wd, "layer": layer})
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise ValueError(
                f"layer_modules() of {type(model).__name__} misses parameters {missing}")
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=base_lr, betas=betas, **fused)

    # -- training --------------------------------------------------------------------
    def train_epoch(self, model, batches, optimizer, grad_clip: float | None = 1.0,
                    scheduler=None) -> float:
        """One pass over `batches` (any iterable of (x, y)); returns the mean loss."""
        return self._run_epoch(model, batches, optimizer, grad_clip, scheduler).loss

    def _run_epoch(self, model, batches, optimizer, grad_clip, scheduler,
                   epoch: int = 0) -> EpochStats:
        self.check_model(model)
        model.to(self.device)
        model.train()
        forward_model = self._distributed(model) if self.world_size > 1 else model
        total, layer_totals, steps = 0.0, {}, 0
        total_hint = len(batches) if hasattr(batches, "__len__") else None
        bar = tqdm(batches, total=total_hint, desc=f"epoch {epoch + 1}", leave=False,
                   disable=not self.progress)
        for step, (x, y) in enumerate(bar, start=1):
            share = 1.0
            if self.world_size > 1:
                x, y, share = self._shard(x, y)
            loss, layer_losses = self.compute_loss(forward_model, x, y)
            if share != 1.0:
                loss = loss * share
                layer_losses = {layer: ce * share for layer, ce in layer_losses.items()}
            if not torch.isfinite(loss):
                per_layer = {layer: round(ce.item(), 4) for layer, ce in layer_losses.items()}
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} of epoch {epoch + 1} "
                    f"(per-layer CE {per_layer}); lower the learning rate or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item()
            for layer, ce in layer_losses.items():
                layer_totals[layer] = layer_totals.get(layer, 0.0) + ce.item()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if steps == 0:
            raise ValueError("train_epoch got no batches: the training data is empty")
        if self.world_size > 1:
            total, layer_totals = self._mean_over_ranks(total, layer_totals)
        return EpochStats(total / steps, {k: v / steps for k, v in layer_totals.items()}, steps)

    # -- data parallel ---------------------------------------------------------------
    def _distributed(self, model) -> _DistributedExits:
        if self._ddp is None or self._ddp.model is not model:
            self._ddp = _DistributedExits(model, self.device)
        return self._ddp

    def _shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's rows of a batch, and its loss factor world * rows / batch: DDP
        averages gradients over ranks, so the factors make that the whole batch's mean
        even when the batch does not split evenly."""
        batch = len(x)
        if batch < self.world_size:
            raise ValueError(f"a batch of {batch} sequences cannot be split over "
                             f"{self.world_size} ranks; use batch_size >= {self.world_size}")
        x, y = (ids.tensor_split(self.world_size)[self.rank] for ids in (x, y))
        return x, y, self.world_size * len(x) / batch

    def _mean_over_ranks(self, total: float, layer_totals: dict[int, float]):
        values = torch.tensor([total, *layer_totals.values()], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        values = (values / self.world_size).tolist()
        return values[0], dict(zip(layer_totals, values[1:], strict=True))

    # -- evaluation ------------------------------------------------------------------
    def exit_layers_for(self, model) -> list[int]:
        if model.exit_layers == (model.num_layers,):
            return [model.num_layers]  # a StandardTransformer has no early exit
        return self.config.resolve_exit_layers(model.num_layers)

    def layer_outputs(self, model, batches, criterion=None) -> LayerOutputs:
        """Every layer's per-token loss, prediction and exit score (one model pass)."""
        self.check_model(model)
        model.to(self.device)
        return collect_layer_outputs(model, batches, self.exit_layers_for(model),
                                     criterion or self.config.criterion(), self.device)

    def evaluate(self, model, batches, threshold: float | None = None, criterion=None) -> dict:
        """Routed loss/ppl/acc, shallow_ratio, compute_cost, exit_counts and per-exit
        loss_L{l}/ppl_L{l}/acc_L{l}. Tokens exit at the first exit layer whose score is
        >= threshold (default: config.routing_threshold); threshold 0 runs every token
        through all layers, as does a StandardTransformer."""
        threshold = self.config.routing_threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold = {threshold} is outside [0, 1]")
        return self.layer_outputs(model, batches, criterion).metrics(threshold)

    # -- the whole run ---------------------------------------------------------------
    def fit(self, model, train, val, epochs: int, base_lr: float = 3e-3, *,
            weight_decay: float = 0.1, grad_clip: float | None = 1.0, warmup_steps: int = 0,
            lr_schedule: str = "cosine", checkpoint_dir: str | Path | None = None,
            on_epoch_end=None) -> pd.DataFrame:
        """Train for `epochs`, evaluating on `val` after each; returns the history.

        With checkpoint_dir, a checkpoint is written atomically after every epoch and a
        later call with the same arguments resumes from it: the run ends with the same
        weights and history as one that was never interrupted. `train` may have
        set_epoch(epoch) (as TokenBatches does) to reshuffle reproducibly per epoch.
        """
        if epochs < 1:
            raise ValueError(f"epochs = {epochs} must be >= 1")
        self.check_model(model)
        model.to(self.device)
        optimizer = self.create_optimizer(model, base_lr, weight_decay)
        steps_per_epoch = len(train) if hasattr(train, "__len__") else None
        scheduler = _lr_scheduler(optimizer, lr_schedule, warmup_steps,
                                  None if steps_per_epoch is None else steps_per_epoch * epochs)
        rows, start = [], 0
        fingerprint = {"training": self.config.to_dict(), "epochs": epochs, "base_lr": base_lr,
                       "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                       "lr_schedule": lr_schedule, "model": repr(model.config)}
        checkpoint = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir else None
        if checkpoint is not None and (checkpoint / "trainer_state.pt").exists():
            start, rows = _load_checkpoint(checkpoint, model, optimizer, scheduler, fingerprint)
        for epoch in range(start, epochs):
            if hasattr(train, "set_epoch"):
                train.set_epoch(epoch)
            began = time.perf_counter()
            stats = self._run_epoch(model, train, optimizer, grad_clip, scheduler, epoch)
            row = {"epoch": epoch + 1, "step": (epoch + 1) * stats.steps, "train_loss": stats.loss}
            row.update({f"train_loss_L{layer}": v for layer, v in stats.layer_losses.items()})
            metrics = self.evaluate(model, val)
            row.update({f"val_{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
            row["seconds"] = time.perf_counter() - began
            rows.append(row)
            if checkpoint is not None and self.rank == 0:
                _save_checkpoint(checkpoint, model, optimizer, scheduler, epoch + 1, rows,
                                 fingerprint)
            if self.world_size > 1:
                dist.barrier()  # a resumed run must find the checkpoint complete on every rank
            if on_epoch_end is not None and self.rank == 0:
                on_epoch_end(epoch + 1, row)
        return pd.DataFrame(rows)


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process
    group unless the script already did: nccl on CUDA, gloo otherwise. A CUDA rank without
    a device index takes the GPU of its LOCAL_RANK."""
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        return 0, 1, device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class _ForwardExits(torch.nn.Module):
    """model.forward_exits as forward(), the one method DistributedDataParallel wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        return self.model.forward_exits(x, layers)


class _DistributedExits:
    """Stands in for the model in compute_loss: DDP averages gradients only for what runs
    through its own forward(), so forward_exits must go through it."""

    def __init__(self, model, device: torch.device):
        self.model = model
        # find_unused_parameters: exits of weight 0, and layers past the deepest weighted
        # exit, get no gradient.
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            _ForwardExits(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)

    def forward_exits(self, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        return self.ddp(x, layers)


def _lr_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int | None):
    if kind == "constant":
        if not warmup_steps:
            return None
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    if kind != "cosine":
        raise ValueError(f"unknown lr_schedule {kind!r}; choose cosine or constant")
    if total_steps is None:
        raise ValueError("a cosine schedule needs len(train); pass lr_schedule='constant'")

    def factor(step: int) -> float:
        # Multiplies each group's own initial lr, so per-layer ratios are kept.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch, rows, fingerprint) -> None:
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": rows,
            "fingerprint": fingerprint,
        }, tmp / "trainer_state.pt")


def _load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint):
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise ValueError(
            f"the checkpoint in {path} was made with different settings ({', '.join(changed)}); "
            "use another checkpoint_dir or delete it to start afresh"
        )
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["epoch"], list(state["history"])
