"""Report figures. Every function takes plain data (DataFrames, dicts), returns a matplotlib Figure
(so callers and tests can inspect its lines before saving) and never touches pyplot's global state:
figures are created directly on the Agg canvas.

One colour per model for the whole report (`ModelColours`), labelled axes with units, legends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.pareto import non_dominated

#: fixed colours for the registry's models; other models take the remaining tab10 colours in name order
FIXED_COLOURS = {
    "sasrec": "#1f77b4",
    "tisasrec": "#ff7f0e",
    "mamba4rec": "#2ca02c",
    "ssd4rec": "#9467bd",
    "tim4rec": "#d62728",
}
SPARE_COLOURS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31")
BACKEND_STYLES = {"torch": "-", "auto": "-", "triton": "--", "cuda": ":", "reference": "-."}
PROTOCOL_MARKERS = {"prefix": "o", "all_positions": "s"}
METRIC_NAMES = {"hit": "HR", "ndcg": "NDCG", "mrr": "MRR"}


class ModelColours:
    """name -> colour, the same in every figure of a report."""

    def __init__(self, models: Iterable[str]):
        self.colours = dict(FIXED_COLOURS)
        others = sorted({m for m in models if m not in FIXED_COLOURS})
        for i, name in enumerate(others):
            self.colours[name] = SPARE_COLOURS[i % len(SPARE_COLOURS)]

    def __call__(self, model: str) -> str:
        return self.colours.get(model, "#000000")


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """PNG without a timestamp or software tag (identical input gives identical bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    return path


def metric_label(metric: str) -> str:
    name, _, k = metric.partition("@")
    return f"{METRIC_NAMES.get(name, name)}@{k}"


def line_labels(fig: Figure) -> list[list[str]]:
    """Legend labels of every axes (a test helper, also used to describe figures)."""
    return [[label for label in ax.get_legend_handles_labels()[1]] for ax in fig.axes]


# ------------------------------------------------------------------------------ accuracy


def metric_vs_hidden(frame: pd.DataFrame, metrics: Sequence[str], colours: ModelColours, title: str) -> Figure:
    """Test metric vs hidden dimension, one line per model (and variant): the mean over seeds, a band
    of ± one standard deviation over seeds, and a hollow marker where one seed stands alone (its
    spread is unknown, not zero: the band narrows to the line there so that it stays continuous).

    frame columns: model, variant, hidden, metric, mean, std, n (seeds).
    """
    metrics = [m for m in metrics if m in set(frame["metric"])]
    fig, axes = new_figure(4.6, 3.8, max(1, len(metrics)))
    hiddens = sorted(int(h) for h in frame["hidden"].dropna().unique())
    for ax, metric in zip(axes, metrics):
        part = frame[frame["metric"] == metric]
        series = sorted(
            {(m, v) for m, v in zip(part["model"], part["variant"])}, key=lambda mv: (_model_key(mv[0]), mv[1])
        )
        for model, variant in series:
            line = part[(part["model"] == model) & (part["variant"] == variant)].sort_values("hidden")
            x = line["hidden"].to_numpy(dtype=float)
            mean = line["mean"].to_numpy(dtype=float)
            std = line["std"].fillna(0.0).to_numpy(dtype=float)
            alone = line["n"].to_numpy() < 2
            colour = colours(model)
            ax.plot(
                x,
                mean,
                label=model + (f" [{variant}]" if variant else ""),
                color=colour,
                marker="o",
                linestyle=("-", "--", ":", "-.")[[v for m, v in series if m == model].index(variant) % 4],
            )
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
            ax.scatter(x[alone], mean[alone], s=36, facecolors="white", edgecolors=colour, zorder=3)
        ax.set_xscale("log", base=2)
        if hiddens:
            ax.set_xticks(hiddens, [str(h) for h in hiddens])
            ax.minorticks_off()
        ax.set_xlabel("hidden dimension (log scale)")
        ax.set_ylabel(f"test {metric_label(metric)} (mean, band ± std over seeds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig


def _natural(value):
    """Numbers in numeric order before text (so L=50 comes before L=200)."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _model_key(model: str):
    order = list(FIXED_COLOURS)
    return (order.index(model), model) if model in order else (len(order), model)


# ------------------------------------------------------------------------------ benchmarks

BENCH_PANELS = (
    ("train_seqs_per_s", "training throughput (sequences/s)", True),
    ("infer_users_per_s", "inference throughput (users/s)", True),
    ("peak_memory_mb", "peak training memory (MB)", False),
)
AXIS_LABELS = {
    "seq_len": "sequence length (items, log scale)",
    "hidden": "hidden dimension (log scale)",
    "chunk_size": "SSD chunk size (positions, log scale)",
}


def bench_series_label(row: pd.Series, keys: Sequence[str]) -> str:
    parts = [str(row["model"])]
    for key in keys:
        value = row[key]
        if key == "backend":
            parts.append(str(value))
        elif key == "protocol":
            parts.append(str(value))
        elif key == "chunk_size" and value not in ("", None):
            parts.append(f"chunk {value}")
        elif key == "hidden":
            parts.append(f"h={value}")
        elif key == "seq_len":
            parts.append(f"L={value}")
    return " ".join(parts)


def bench_vs(
    frame: pd.DataFrame, x: str, series_keys: Sequence[str], colours: ModelColours, title: str, memory_source: str = ""
) -> Figure:
    """Throughput and peak memory vs one axis (seq_len, hidden or chunk_size), one line per series.

    frame: one row per bench cell with the axis columns (model, backend, protocol, chunk_size, hidden,
    seq_len) and the metrics of BENCH_PANELS.
    """
    fig, axes = new_figure(4.6, 3.8, len(BENCH_PANELS))
    keys = ["model", *series_keys]
    frame = frame.copy()
    frame["_label"] = [bench_series_label(r, series_keys) for _, r in frame.iterrows()]
    groups = sorted(
        frame.groupby(keys, sort=False), key=lambda kv: (_model_key(kv[0][0]), tuple(_natural(v) for v in kv[0][1:]))
    )
    xs = sorted(frame[x].astype(int).unique())
    for ax, (metric, label, log) in zip(axes, BENCH_PANELS):
        for _key, part in groups:
            part = part.sort_values(x)
            row = part.iloc[0]
            ax.plot(
                part[x].astype(float).to_numpy(),
                part[metric].astype(float).to_numpy(),
                label=row["_label"],
                color=colours(str(row["model"])),
                linestyle=BACKEND_STYLES.get(str(row.get("backend", "")), "-"),
                marker=PROTOCOL_MARKERS.get(str(row.get("protocol", "")), "o"),
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(AXIS_LABELS.get(x, x))
        ylabel = label + (f"\n[{memory_source}]" if metric == "peak_memory_mb" and memory_source else "")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    fig.suptitle(title, fontsize="medium")
    return fig


# ------------------------------------------------------------------------------ studies


def best_so_far(values: Sequence[float], direction: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return np.maximum.accumulate(x) if direction == "maximize" else np.minimum.accumulate(x)


def optimisation_history(trials: pd.DataFrame, direction: str, objective: str, title: str) -> Figure:
    """Objective per trial number (points) and the best value so far (step line).

    trials columns: number, value (finished trials only)."""
    fig, (ax,) = new_figure(6.4, 4.0)
    trials = trials.sort_values("number")
    numbers = trials["number"].to_numpy(dtype=float)
    values = trials["value"].to_numpy(dtype=float)
    ax.plot(numbers, values, linestyle="none", marker="o", color="#1f77b4", alpha=0.7, label="trial objective")
    ax.plot(
        numbers,
        best_so_far(values, direction),
        drawstyle="steps-post",
        color="#d62728",
        label=f"best so far ({direction})",
    )
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective_0: {objective}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title, fontsize="medium")
    return fig


def param_importances(importances: dict[str, float], method: str, title: str) -> Figure:
    """Horizontal bars, most important on top."""
    items = sorted(importances.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, (ax,) = new_figure(6.4, max(2.2, 0.45 * len(items) + 1.2))
    names = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    ax.barh(names, values, color="#1f77b4", label=method)
    ax.set_xlabel(f"importance for objective_0 ({method}; fractions sum to 1)")
    ax.set_ylabel("hyper-parameter")
    ax.set_xlim(0, max(1.0, max(values, default=0) * 1.05))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title, fontsize="medium")
    return fig


def pareto_plot(trials: pd.DataFrame, directions: Sequence[str], names: Sequence[str], title: str) -> Figure:
    """objective_0 vs objective_1 of every trial, the Pareto-optimal ones joined.

    trials columns: number, objective_0, objective_1."""
    fig, (ax,) = new_figure(6.4, 4.4)
    values = trials[["objective_0", "objective_1"]].to_numpy(dtype=float)
    mask = non_dominated(values, directions[:2])
    ax.plot(
        values[~mask, 0],
        values[~mask, 1],
        linestyle="none",
        marker="o",
        color="#7f7f7f",
        alpha=0.6,
        label="dominated trials",
    )
    front = values[mask]
    front = front[np.argsort(front[:, 0], kind="stable")]
    ax.plot(front[:, 0], front[:, 1], marker="o", color="#d62728", label="Pareto front")
    ax.set_xlabel(f"objective_0: {names[0]} ({directions[0]})")
    ax.set_ylabel(f"objective_1: {names[1]} ({directions[1]})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title, fontsize="medium")
    return fig


def is_finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
