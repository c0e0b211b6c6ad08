"""The workbook's figures. Each function takes tidy results and returns a Figure in the
EASE style, so notebooks, batch runs and tests draw exactly the same thing."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from .analysis import pareto_front
from .plotting import figure, layer_colors, palette
from .results import mean_and_error


def per_layer_metric(per_exit: pd.DataFrame, metric: str = "ppl", hue: str = "name",
                     width: str = "single", title: str | None = None, log: bool = False):
    """Metric of every exit by layer, one line per `hue` value, mean ± 95% CI over seeds."""
    summary = mean_and_error(per_exit, [hue, "layer"], metric)
    fig, ax = figure(width)
    names = list(dict.fromkeys(summary[hue]))
    offsets = np.linspace(-0.12, 0.12, len(names)) if len(names) > 1 else [0.0]
    for color, offset, name in zip(palette(len(names)), offsets, names, strict=True):
        rows = summary[summary[hue] == name]
        ax.errorbar(rows["layer"] + offset, rows["mean"], yerr=rows["ci95"].fillna(0),
                    marker="o", color=color, label=name)
    layers = sorted(summary["layer"].unique())
    if len(layers) <= 12:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("exit layer")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if log:
        ax.set_yscale("log")
        if summary["mean"].max() < 100 * summary["mean"].min():
            # Within two decades plain numbers read better than "6 x 10^0".
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
    if title:
        ax.set_title(title)
    ax.legend(ncols=2 if len(names) > 3 else 1)
    return fig


def training_curves(curves: pd.DataFrame, width: str = "double"):
    """Validation loss of every exit over training, one panel per scheme, mean over seeds."""
    names = list(dict.fromkeys(curves["name"]))
    num_layers = int(curves["layer"].max())
    fig, axes = figure(width, aspect=0.3 if len(names) <= 4 else 0.5,
                       ncols=min(len(names), 4), nrows=-(-len(names) // 4), sharey=True,
                       squeeze=False)
    colors = layer_colors(num_layers)
    for ax, name in zip(axes.flat, names, strict=False):
        rows = curves[curves["name"] == name]
        summary = mean_and_error(rows, ["layer", "step"], "val_loss")
        for layer in range(1, num_layers + 1):
            line = summary[summary["layer"] == layer]
            ax.plot(line["step"], line["mean"], color=colors[layer - 1], label=f"L{layer}")
            ax.fill_between(line["step"], line["mean"] - line["std"].fillna(0),
                            line["mean"] + line["std"].fillna(0), color=colors[layer - 1],
                            alpha=0.2, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("validation loss")
    axes.flat[0].legend(title="exit")
    return fig


def quality_vs_compute(sweeps: dict[str, pd.DataFrame], metric: str = "acc", width: str = "single",
                       oracle: pd.DataFrame | None = None):
    """Threshold sweeps as quality-vs-compute curves, one per model or criterion, the Pareto
    front over all of them, and optionally an oracle curve (analysis.oracle_curve) as the
    upper bound no exit rule can pass."""
    fig, ax = figure(width)
    colors = palette(len(sweeps))
    for color, (name, sweep) in zip(colors, sweeps.items(), strict=True):
        ordered = sweep.sort_values("compute_cost")
        ax.plot(ordered["compute_cost"], ordered[metric], marker=".", color=color, label=name)
    everything = pd.concat(sweeps.values(), ignore_index=True)
    front = pareto_front(everything, "compute_cost", metric, maximize=metric != "ppl")
    ax.step(front["compute_cost"], front[metric], where="post", color="black", linestyle=":",
            linewidth=0.8, label="Pareto front")
    if oracle is not None:
        ordered = oracle.sort_values("compute_cost")
        ax.plot(ordered["compute_cost"], ordered[metric], color="black", linestyle="--",
                marker="*", label="oracle")
    ax.set_xlabel("compute cost (mean exit layer / L)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend()
    return fig


METRIC_LABELS = {"ppl": "perplexity", "acc": "next-token accuracy",
                 "agreement": "agreement with the last layer"}


def overthinking_bars(table: pd.DataFrame, width: str = "single"):
    """Wasteful and destructive overthinking rates per early exit (analysis.overthinking)."""
    fig, ax = figure(width)
    layers = table["layer"].to_numpy()
    ax.bar(layers - 0.18, table["wasteful"], width=0.36, label="wasteful", color=palette(2)[0])
    ax.bar(layers + 0.18, table["destructive"], width=0.36, label="destructive",
           color=palette(2)[1])
    ax.set_xticks(layers)
    ax.set_xlabel("right by exit layer")
    ax.set_ylabel("fraction of tokens")
    ax.legend()
    return fig


def reliability_diagrams(bins_by_layer: dict[int, pd.DataFrame], width: str = "double"):
    """One reliability diagram per exit (analysis.reliability_diagram tables)."""
    layers = sorted(bins_by_layer)
    fig, axes = figure(width, aspect=0.3, ncols=len(layers), sharey=True, squeeze=False)
    colors = layer_colors(max(layers))
    for ax, layer in zip(axes.flat, layers, strict=True):
        bins = bins_by_layer[layer]
        filled = bins[bins["count"] > 0]
        ax.bar(filled["bin_lower"], filled["accuracy"],
               width=filled["bin_upper"] - filled["bin_lower"], align="edge",
               color=colors[layer - 1], edgecolor="white", linewidth=0.3)
        ax.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"exit L{layer}")
        ax.set_xlabel("confidence")
    axes.flat[0].set_ylabel("accuracy")
    return fig


def exit_share_by_difficulty(table: pd.DataFrame, width: str = "single"):
    """Stacked share of tokens leaving at each layer, per difficulty class
    (analysis.difficulty_breakdown with a threshold)."""
    columns = [c for c in table.columns if c.startswith("exit_share_L")]
    layers = [int(c.removeprefix("exit_share_L")) for c in columns]
    colors = layer_colors(max(layers))
    fig, ax = figure(width)
    left = np.zeros(len(table))
    for column, layer in zip(columns, layers, strict=True):
        ax.barh(table.index, table[column], left=left, color=colors[layer - 1], label=f"L{layer}")
        left += table[column].to_numpy()
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of tokens leaving at each exit")
    ax.legend(title="exit", loc="lower right")
    return fig
