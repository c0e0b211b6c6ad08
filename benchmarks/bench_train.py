"""What does deep supervision cost per training step? Timed next to a Hugging Face Llama.

One run, the same data and dims for every model:
  standard       StandardTransformer, loss on the last layer
  ds_final       DeepSupervisionTransformer, loss on the last layer only
  ds_asymmetric  DeepSupervisionTransformer, {1: 0.7, L: 0.3}
  ds_all         DeepSupervisionTransformer, 1/L on every exit
  llama          transformers.LlamaForCausalLM, same dims, tied embeddings, sdpa attention

A step is forward, loss, backward, gradient clipping and an AdamW step. The ease models
use Trainer.compute_loss and Trainer.create_optimizer; Llama gets the same AdamW settings
and the same loss (cross-entropy on the final logits). Warmup steps are not timed; the
timed repeats rotate the model order, so a machine that slows down or speeds up during
the run does not favour one model. Memory is counted in bytes the allocator hands out:
the model's state (weights, AdamW moments) and the peak a step adds on top (gradients,
activations, temporaries).

Targets: ds_final within 3% of standard (an unused exit must cost nothing), and
ds_all/standard within 1.1x of the ratio predicted from matmul FLOPs.

    nice python benchmarks/bench_train.py --json bench_train.json

On a CPU shared with other jobs, --threads 1 keeps the timings steady: with every core's
thread busy, one thread descheduled stalls the step for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ease import (
    DeepSupervisionTransformer,
    ModelConfig,
    StandardTransformer,
    TokenBatches,
    Trainer,
    TrainingConfig,
    set_seed,
)

MODELS = ("standard", "ds_final", "ds_asymmetric", "ds_all", "llama")
FINAL_ONLY_TOLERANCE = 0.03  # ds_final / standard may differ from 1 by this much
FLOP_RATIO_TOLERANCE = 1.1  # measured / predicted ds_all ratio, either way


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--repeats", type=int, default=10, help="rounds over all models")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device {args.device!r}: choose auto, cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    for name in ("vocab_size", "dim", "layers", "heads", "seq_len", "batch_size", "repeats",
                 "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup = {args.warmup} must be >= 0")
    if args.layers < 2:
        parser.error(f"--layers = {args.layers}: the asymmetric case needs >= 2 layers")
    return args


# -- the models under test ---------------------------------------------------------------

@dataclass
class Case:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weighted_layers: list[int]  # exits that carry a loss, for the FLOP count


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab_size, dim=args.dim, num_layers=args.layers,
                       num_heads=args.heads, max_seq_len=args.seq_len)


def layer_weights(name: str, num_layers: int) -> dict[int, float]:
    if name in ("standard", "ds_final", "llama"):
        return {num_layers: 1.0}
    if name == "ds_asymmetric":
        return {1: 0.7, num_layers: 0.3}
    if name == "ds_all":
        return {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def build_case(name: str, args, device: torch.device) -> Case:
    set_seed(args.seed)
    config = model_config(args)
    weights = layer_weights(name, args.layers)
    if name == "llama":
        return build_llama(config, args, device, list(weights))
    model_cls = StandardTransformer if name == "standard" else DeepSupervisionTransformer
    model = model_cls(config=config).to(device)
    trainer = Trainer(TrainingConfig(layer_weights=weights, name=name), args.vocab_size,
                      str(device), progress=False)
    optimizer = trainer.create_optimizer(model, args.lr, args.weight_decay)
    return Case(name, model, optimizer, lambda x, y: trainer.compute_loss(model, x, y)[0],
                list(weights))


def build_llama(config: ModelConfig, args, device: torch.device, weighted: list[int]) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=config.ffn_hidden_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(llama_config).to(device)
    model.train()
    # The AdamW of Trainer.create_optimizer: betas (0.9, 0.95), no decay on 1-D tensors.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), **fused)

    def loss(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return Case("llama", model, optimizer, loss, weighted)


def make_batches(args, device: torch.device, count: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """A few fixed batches of random tokens: step time does not depend on what they say."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(args.vocab_size, (count * args.batch_size * (args.seq_len + 1),),
                        generator=generator)
    batches = TokenBatches(ids, args.seq_len, args.batch_size, shuffle=True, seed=args.seed,
                           num_batches=count)
    return [(x.to(device), y.to(device)) for x, y in batches]


def train_step(case: Case, x: torch.Tensor, y: torch.Tensor, grad_clip: float) -> None:
    """The body of Trainer._run_epoch's loop, without its logging."""
    loss = case.loss(x, y)
    case.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), grad_clip)
    case.optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- FLOPs -------------------------------------------------------------------------------

def step_flops(config: ModelConfig, batch_size: int, seq_len: int, weighted_layers) -> int:
    """Matmul FLOPs of one training step (backward = 2x forward). Norms, softmax and the
    optimizer are left out; attention scores count the full T x T square."""
    tokens = batch_size * seq_len
    dim, ffn = config.dim, config.ffn_hidden_dim
    per_layer = 2 * tokens * (4 * dim * dim + 3 * dim * ffn) + 2 * 2 * batch_size * seq_len**2 * dim
    exit_head = 2 * tokens * dim * config.vocab_size
    forward = max(weighted_layers) * per_layer + len(weighted_layers) * exit_head
    return 3 * forward


# -- memory ------------------------------------------------------------------------------

def state_bytes(case: Case) -> int:
    """Weights, buffers and optimizer state: what a model holds between steps."""
    tensors = {id(t): t for t in (*case.model.parameters(), *case.model.buffers())}
    for state in case.optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_peak_bytes(case: Case, batch, grad_clip: float, device: torch.device) -> int:
    """Peak bytes a training step allocates on top of the model's state: gradients,
    activations and temporaries, the gradients of the previous step dropped first.
    CUDA: torch.cuda.max_memory_allocated. CPU: the running total of the allocations the
    profiler records (the same count, kept by the profiler since CPU has no peak stat)."""
    case.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(case, *batch, grad_clip)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        train_step(case, *batch, grad_clip)
    allocations = sorted(
        (event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size)
        for event in _walk(profiler.profiler.kineto_results.experimental_event_tree())
        if event.tag == torch._C._profiler._EventType.Allocation
    )
    # total_allocated is the allocator's running total; the level before the step is the
    # first event's total minus that event's own (de)allocation.
    _, first_total, first_size = allocations[0]
    return max(total for _, total, _ in allocations) - (first_total - first_size)


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


# -- the run -----------------------------------------------------------------------------

def time_steps(cases: list[Case], batches, args, device: torch.device) -> dict[str, list[float]]:
    for case in cases:
        for i in range(args.warmup):
            train_step(case, *batches[i % len(batches)], args.grad_clip)
    seconds = {case.name: [] for case in cases}
    for repeat in range(args.repeats):
        shift = repeat % len(cases)
        for case in cases[shift:] + cases[:shift]:
            for i in range(args.steps):
                x, y = batches[(repeat * args.steps + i) % len(batches)]
                synchronize(device)
                began = time.perf_counter()
                train_step(case, x, y, args.grad_clip)
                synchronize(device)
                seconds[case.name].append(time.perf_counter() - began)
    return seconds


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":  # cuda or cpu only: memory is counted for those two
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)

    config = model_config(args)
    cases = [build_case(name, args, device) for name in MODELS]
    batches = make_batches(args, device)
    seconds = time_steps(cases, batches, args, device)
    step_peak = {case.name: step_peak_bytes(case, batches[0], args.grad_clip, device)
                 for case in cases}

    results = {}
    for case in cases:
        flops = step_flops(config, args.batch_size, args.seq_len, case.weighted_layers)
        median = statistics.median(seconds[case.name])
        results[case.name] = {
            "median_ms": 1000 * median,
            "min_ms": 1000 * min(seconds[case.name]),
            "max_ms": 1000 * max(seconds[case.name]),
            "timed_steps": len(seconds[case.name]),
            "parameters": sum(p.numel() for p in case.model.parameters()),
            "step_gflops": flops / 1e9,
            "gflops_per_s": flops / median / 1e9,
            "state_mib": state_bytes(case) / 2**20,
            "step_peak_mib": step_peak[case.name] / 2**20,
        }

    def ratio(a: str, b: str) -> float:
        return results[a]["median_ms"] / results[b]["median_ms"]

    predicted_all = results["ds_all"]["step_gflops"] / results["standard"]["step_gflops"]
    measured_all = ratio("ds_all", "standard")
    final_only = ratio("ds_final", "standard")
    off_by = max(measured_all / predicted_all, predicted_all / measured_all)
    ratios = {
        "standard/llama": ratio("standard", "llama"),
        "ds_final/standard": final_only,
        "ds_asymmetric/standard": ratio("ds_asymmetric", "standard"),
        "ds_asymmetric/standard predicted": (results["ds_asymmetric"]["step_gflops"]
                                             / results["standard"]["step_gflops"]),
        "ds_all/standard": measured_all,
        "ds_all/standard predicted": predicted_all,
    }
    targets = {
        f"ds_final/standard within {FINAL_ONLY_TOLERANCE:.0%} of 1":
            abs(final_only - 1) <= FINAL_ONLY_TOLERANCE,
        f"ds_all/standard within {FLOP_RATIO_TOLERANCE}x of the FLOP prediction":
            off_by <= FLOP_RATIO_TOLERANCE,
    }
    machine = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

    print(f"{machine['device']} ({machine['device_name']}), torch {machine['torch']}, "
          f"{machine['torch_threads']} threads | vocab {args.vocab_size}, dim {args.dim}, "
          f"{args.layers} layers, {args.heads} heads, ffn {config.ffn_hidden_dim}, "
          f"batch {args.batch_size} x {args.seq_len} tokens")
    print(f"\n{'model':<15}{'median ms':>10}{'min ms':>8}{'max ms':>8}{'GFLOP':>7}"
          f"{'GFLOP/s':>9}{'state MiB':>11}{'step MiB':>10}")
    for name, row in results.items():
        print(f"{name:<15}{row['median_ms']:>10.1f}{row['min_ms']:>8.1f}{row['max_ms']:>8.1f}"
              f"{row['step_gflops']:>7.2f}{row['gflops_per_s']:>9.1f}{row['state_mib']:>11.1f}"
              f"{row['step_peak_mib']:>10.1f}")
    print()
    for name, value in ratios.items():
        print(f"{name:<34}{value:.3f}")
    print()
    for name, passed in targets.items():
        print(f"{verdict(passed)}  {name}")
    print(f"\n{args.repeats * args.steps} timed steps per model after {args.warmup} warmup. "
          "state: weights + AdamW moments; step: peak allocated bytes a step adds on top "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'profiler'}).")

    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python benchmarks/bench_train.py", *argv]),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "ffn_hidden_dim": config.ffn_hidden_dim,
            "machine": machine,
            "models": results,
            "ratios": ratios,
            "targets": {name: verdict(passed) for name, passed in targets.items()},
        }, indent=2) + "\n")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
