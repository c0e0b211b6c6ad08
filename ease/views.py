"""Interactive views: the callbacks behind the notebooks' sliders. Each takes plain
values and returns a matplotlib Figure, so tests call them without a browser and the
notebook only wires ipywidgets.interact to them."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgba

from .evaluation import LayerOutputs
from .generation import generate, tokens_by_depth
from .plotting import figure, layer_colors


def colored_tokens(ax, tokens: list[str], layers: list[int], num_layers: int,
                   chars_per_line: int = 80) -> None:
    """Draw tokens left to right, wrapped, each on a background of its exit layer's colour
    (grey for layer None, e.g. prompt tokens)."""
    colors = layer_colors(num_layers)
    ax.set_axis_off()
    lines, line, width = [], [], 0
    for token, layer in zip(tokens, layers, strict=False):
        text = token.strip(" ").replace("\n", "⏎") or "␣"
        if width + len(text) + 1 > chars_per_line and line:
            lines.append(line)
            line, width = [], 0
        line.append((width, text, layer))
        width += len(text) + 1
    lines.append(line)
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(max(len(lines), 6) + 0.5, 0.5)  # a short text keeps its line spacing
    for row, line in enumerate(lines, start=1):
        for column, text, layer in line:
            # layer None: a prompt token, which no exit produced.
            face = to_rgba("0.85" if layer is None else colors[layer - 1], 0.55)
            ax.text(column, row, text, family="monospace", fontsize=7, va="center", ha="left",
                    bbox={"boxstyle": "square,pad=0.15", "linewidth": 0, "facecolor": face})
    handles = [ax.scatter([], [], marker="s", color=colors[i], label=f"L{i + 1}")
               for i in range(num_layers)]
    ax.legend(handles=handles, title="exit layer", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def routing_view(outputs: LayerOutputs, threshold: float, sweep, tokens: list[str] | None = None,
                 sample: int = 80, title: str = ""):
    """What one routing threshold does: the quality-vs-compute curve with this threshold
    marked, the histogram of exit layers, and a text sample coloured by exit layer.

    outputs: per-token outputs of one model (Trainer.layer_outputs); sweep: its
    outputs.sweep(thresholds) table; tokens: the text of outputs' target tokens."""
    metrics = outputs.metrics(threshold)
    num_layers = outputs.num_layers
    fig, axes = figure("double", aspect=0.62 if tokens else 0.33, nrows=2 if tokens else 1,
                       ncols=2, squeeze=False,
                       gridspec_kw={"height_ratios": [1.2, 1]} if tokens else None)
    curve, hist = axes[0]
    ordered = sweep.sort_values("compute_cost")
    curve.plot(ordered["compute_cost"], ordered["acc"], marker=".", color="0.5", label="sweep")
    curve.scatter([metrics["compute_cost"]], [metrics["acc"]], s=60, color="C3", zorder=3,
                  label=f"threshold {threshold:.2f}")
    curve.set_xlabel("compute cost (mean exit layer / L)")
    curve.set_ylabel("next-token accuracy")
    curve.legend(loc="lower right")
    counts = np.array([metrics["exit_counts"][layer] for layer in range(1, num_layers + 1)])
    hist.bar(range(1, num_layers + 1), counts / counts.sum(), color=layer_colors(num_layers))
    hist.set_xticks(range(1, num_layers + 1))
    hist.set_ylim(0, 1)
    hist.set_xlabel("exit layer")
    hist.set_ylabel("fraction of tokens")
    if tokens:
        text_ax = fig.add_subplot(axes[1, 0].get_subplotspec().get_gridspec()[1, :])
        axes[1, 0].remove()
        axes[1, 1].remove()
        layers = outputs.exit_layer(threshold)[:sample].tolist()
        colored_tokens(text_ax, tokens[:sample], layers, num_layers)
    fig.suptitle(f"{title + ': ' if title else ''}threshold {threshold:.2f} | acc "
                 f"{metrics['acc']:.3f} | ppl {metrics['ppl']:.2f} | compute "
                 f"{metrics['compute_cost']:.3f} | shallow {metrics['shallow_ratio']:.1%}")
    return fig


def generation_view(model, prompt_ids, tokenizer, threshold: float, max_new_tokens: int = 40,
                    kv_fill: str = "propagate", criterion: str = "max_prob"):
    """Generate greedily with early exit at `threshold` and draw the text coloured by the
    layer each token left at, titled with the layers computed and the agreement with
    full-depth greedy decoding of the same prompt."""
    full = generate(model, prompt_ids, max_new_tokens)
    early = generate(model, prompt_ids, max_new_tokens, threshold=threshold, kv_fill=kv_fill,
                     criterion=criterion)
    agreement = (early.new_tokens == full.new_tokens).double().mean().item()
    pieces = tokens_by_depth(early, tokenizer)
    fig, ax = figure("double", aspect=0.3)
    colored_tokens(ax, [text for text, _ in pieces], [layer for _, layer in pieces],
                   model.num_layers)
    ax.set_title(f"threshold {threshold:.2f} | {early.mean_layers_computed:.2f} of "
                 f"{model.num_layers} layers per token | theoretical speedup "
                 f"{early.theoretical_speedup:.2f}x | same token as full model "
                 f"{agreement:.0%}")
    return fig
