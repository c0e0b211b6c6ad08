"""Does early exit make generation faster, by as much as the layers it skips?

A DeepSupervisionTransformer (an exit after every layer) is trained briefly on the
synthetic corpus (cached under runs/bench_cache, deterministic from the seed), then
generates greedily from validation prompts at batch 1 and batch 8 with:
  full                threshold 0: every token runs every layer
  exit_propagate_t    early exit at max_prob >= t, skipped layers' K/V projected from
                      the exit's hidden state (CALM)
  exit_recompute_t    early exit at max_prob >= t, skipped positions run through the
                      missing layers later, batched with the token that needs them
  spec_E{e}_k{k}      self-speculative (LayerSkip): draft k tokens with layers 1..e

Reported per method: tokens/s, mean layers computed per token (K/V fills at their
weight share, kv_fill_cost), agreement with full decoding (share of positions with the
same token), and
  theoretical speedup = num_layers / mean layers computed
  realized speedup    = tokens/s / full tokens/s       target: realized / theoretical >= 0.85
For self-speculative decoding, the break-even acceptance rate: with a draft step of time
t_d, a verify pass over k positions of time t_v and a full decoding step of time t_f, a
round pays off when it emits more than (k t_d + t_v) / t_f tokens; with independent
per-token acceptance a, a round emits (1 - a^k) / (1 - a) tokens and the acceptance rate
(accepted / drafted) is a (1 - a^k) / ((1 - a) k). t_f, t_d and t_v are timed alike, on
their own (layer calls at shared positions); "(model mismatch)" flags a run whose measured
speed disagrees with that prediction, i.e. costs the three parts leave out.

    nice python benchmarks/bench_generate.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from functools import partial
from pathlib import Path

import torch

from ease import DeepSupervisionTransformer, TokenBatches, Trainer, set_seed, set_threads
from ease.config import create_deep_supervision_config
from ease.data import synthetic_corpus
from ease.generation import generate, generate_self_speculative

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.85  # realized / theoretical speedup


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.9])
    parser.add_argument("--draft-layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(REPO_ROOT / "runs" / "bench_cache"))
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


def trained_model(args, corpus) -> DeepSupervisionTransformer:
    """Train once per setting; later runs load the cached weights."""
    setting = {key: getattr(args, key) for key in
               ("dim", "layers", "heads", "max_seq_len", "train_steps", "train_batch", "seq_len",
                "lr", "seed")}
    tag = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    directory = Path(args.cache_dir) / f"generate_{tag}"
    if (directory / "config.json").exists():
        return DeepSupervisionTransformer.from_pretrained(directory).eval()
    set_seed(args.seed)
    model = DeepSupervisionTransformer(vocab_size=corpus.vocab_size, dim=args.dim,
                                       num_layers=args.layers, num_heads=args.heads,
                                       max_seq_len=args.max_seq_len)
    trainer = Trainer(create_deep_supervision_config(args.layers), corpus.vocab_size,
                      progress=False)
    batches = TokenBatches(corpus.train, args.seq_len, args.train_batch, shuffle=True,
                           seed=args.seed, num_batches=args.train_steps)
    began = time.perf_counter()
    trainer.train_epoch(model, batches, trainer.create_optimizer(model, args.lr))
    print(f"trained {args.train_steps} steps in {time.perf_counter() - began:.0f}s")
    model.save_pretrained(directory)
    return model.eval()


def timed(fn, repeats: int):
    """Fastest of `repeats` calls after one warmup (other processes only ever add time),
    and the result."""
    result = fn()
    return min(_seconds(fn) for _ in range(repeats)), result


def timed_together(methods: dict, repeats: int) -> dict:
    """{name: (seconds, result)}: the fastest of `repeats` rounds, each round calling every
    method once in a rotated order, so a machine that slows down favours none of them."""
    results = {name: fn() for name, fn in methods.items()}  # warmup
    best = dict.fromkeys(methods, math.inf)
    names = list(methods)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            best[name] = min(best[name], _seconds(methods[name]))
    return {name: (best[name], results[name]) for name in names}


def _seconds(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


@torch.no_grad()
def round_parts(model, prompt, draft_layer: int, draft_tokens: int, repeats: int):
    """Seconds of a full decoding step (every layer at one position, then the last exit),
    a draft step (layers 1..E at one position, then exit E) and a verify pass (layers
    E+1..L over draft_tokens positions), each after a prefilled prompt, timed alike."""
    batch, length = prompt.shape
    cache = model.new_cache(batch, length + draft_tokens)
    positions = torch.arange(length).expand(batch, -1)
    h = model.embed(prompt, positions)
    for layer in range(1, model.num_layers + 1):
        h = model.layer_step(layer, h, positions, cache)
    one = torch.full((batch, 1), length)
    several = length + torch.arange(draft_tokens).expand(batch, -1)

    def step(upto):
        x = model.embed(prompt[:, -1:], one)
        for layer in range(1, upto + 1):
            x = model.layer_step(layer, x, one, cache)
        return model.exit_logits(x[:, 0], upto).argmax(-1)

    def verify():
        x = h[:, -1:].expand(-1, draft_tokens, -1)
        for layer in range(draft_layer + 1, model.num_layers + 1):
            x = model.layer_step(layer, x, several, cache)
        return model.exit_logits(x, model.num_layers).argmax(-1)

    calls = repeats * 10
    return (timed(partial(step, model.num_layers), calls)[0],
            timed(partial(step, draft_layer), calls)[0], timed(verify, calls)[0])


def break_even_acceptance(tokens_needed: float, k: int) -> float:
    """Acceptance rate (accepted / drafted) at which a round emits tokens_needed tokens,
    under independent per-token acceptance; nan when no rate reaches it (needed > k)."""
    if tokens_needed <= 1:
        return 0.0
    if tokens_needed >= k:
        return math.nan

    def emitted(a):
        return sum(a ** i for i in range(k))

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if emitted(mid) < tokens_needed else (low, mid)
    a = (low + high) / 2
    return a * emitted(a) / k


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    corpus = synthetic_corpus(seed=args.seed)
    model = trained_model(args, corpus)
    num_layers = model.num_layers
    print(f"model: dim={args.dim} layers={num_layers} heads={args.heads} "
          f"params={model.num_parameters():,}  kv_fill_cost={model.kv_fill_cost:.3f}  "
          f"threads={torch.get_num_threads()}")
    windows = corpus.val[: max(args.batches) * args.prompt_len * 4].view(-1, args.prompt_len * 4)
    rows = []
    for batch in args.batches:
        prompt = windows[:batch, :args.prompt_len]
        methods = {
            "full": partial(generate, model, prompt, args.new_tokens),
        }
        for threshold in args.thresholds:
            for kv_fill in ("propagate", "recompute"):
                methods[f"exit_{kv_fill}_{threshold:g}"] = partial(
                    generate, model, prompt, args.new_tokens, threshold=threshold,
                    kv_fill=kv_fill)
        for draft_layer in args.draft_layers:
            methods[f"spec_E{draft_layer}_k{args.draft_tokens}"] = partial(
                generate_self_speculative, model, prompt, args.new_tokens,
                draft_layer=draft_layer, num_draft_tokens=args.draft_tokens)
        timings = timed_together(methods, args.repeats)
        full_seconds, full = timings["full"]
        for name, (seconds, result) in timings.items():
            row = _row(name, batch, seconds, result, full, full_seconds)
            if name.startswith("spec"):
                draft_layer = int(name.split("_")[1][1:])
                t_step, t_draft, t_verify = round_parts(model, prompt, draft_layer,
                                                        args.draft_tokens, args.repeats)
                needed = (args.draft_tokens * t_draft + t_verify) / t_step
                row.update(acceptance=result.acceptance_rate,
                           tokens_per_round=result.tokens_per_round,
                           break_even_tokens_per_round=needed,
                           break_even_acceptance=break_even_acceptance(needed, args.draft_tokens))
            rows.append(row)
    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _row(name, batch, seconds, result, full, full_seconds) -> dict:
    tokens = result.num_generated
    return {
        "method": name, "batch": batch, "tokens_per_s": tokens / seconds,
        "mean_layers": result.mean_layers_computed,
        "mean_exit_layer": result.mean_exit_layer,
        "agreement": (result.new_tokens == full.new_tokens).double().mean().item(),
        "theoretical": result.theoretical_speedup,
        "realized": full_seconds / seconds * tokens / full.num_generated,
    }


def _print(rows) -> None:
    print(f"{'method':<20}{'batch':>6}{'tok/s':>9}{'layers':>8}{'agree':>7}{'theory':>8}"
          f"{'real':>7}{'real/theory':>12}")
    for row in rows:
        ratio = row["realized"] / row["theoretical"]
        verdict = ""
        if row["method"].startswith("exit"):
            verdict = "  ok" if ratio >= TARGET else f"  below {TARGET}"
        print(f"{row['method']:<20}{row['batch']:>6}{row['tokens_per_s']:>9.1f}"
              f"{row['mean_layers']:>8.2f}{row['agreement']:>7.3f}{row['theoretical']:>8.2f}"
              f"{row['realized']:>7.2f}{ratio:>12.2f}{verdict}")
    for row in rows:
        if "acceptance" in row:
            faster = row["realized"] > 1
            above = row["acceptance"] > row["break_even_acceptance"]
            print(f"{row['method']} batch {row['batch']}: acceptance {row['acceptance']:.3f}, "
                  f"{row['tokens_per_round']:.2f} tokens/round; break-even "
                  f"{row['break_even_tokens_per_round']:.2f} tokens/round = acceptance "
                  f"{row['break_even_acceptance']:.3f}; {'above' if above else 'below'} it, "
                  f"{'faster' if faster else 'not faster'} than full "
                  f"({row['realized']:.2f}x){'' if above == faster else '  (model mismatch)'}")


if __name__ == "__main__":
    main()
