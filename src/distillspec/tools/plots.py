"""PNG plots for bench and demo reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """tokens/s against gamma per method, and measured vs predicted speed-up, per setting
    (the fixed-gamma rows, threshold 0, when several thresholds were measured)."""
    plt = _pyplot()
    settings = report["settings"]
    figure, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 7), squeeze=False)
    for column, setting in enumerate(settings):
        thresholds = sorted({r["confidence_threshold"] for r in setting["rows"]})
        top, bottom = axes[0][column], axes[1][column]
        for threshold in thresholds:
            rows = [r for r in setting["rows"] if r["confidence_threshold"] == threshold]
            gammas = [r["gamma"] for r in rows]
            label = "ours SD" + (f" (threshold {threshold:g})" if threshold else "")
            top.plot(gammas, [r["tokens_per_s"] for r in rows], "o-", label=label)
            bottom.plot(gammas, [r["speedup"] for r in rows], "o-", label=f"measured {label}")
            bottom.plot(gammas, [r["predicted_speedup"] for r in rows], "x--",
                        label=f"predicted {label}")
            if threshold == thresholds[0] and rows[0]["hf_assisted"]:
                top.plot(gammas, [r["hf_assisted"]["tokens_per_s"] for r in rows], "s--",
                         label="HF assisted")
        top.axhline(setting["ours_plain_tokens_per_s"], color="grey", label="ours plain")
        top.axhline(setting["hf_plain"]["tokens_per_s"], color="black", ls=":", label="HF plain")
        top.set_title(f"T={setting['temperature']:g}, batch {setting['batch_size']}")
        top.set_xlabel("gamma")
        top.set_ylabel("tokens/s")
        top.legend(fontsize=7)
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set_xlabel("gamma")
        bottom.set_ylabel("speed-up vs target alone")
        bottom.legend(fontsize=7)
    figure.tight_layout()
    path = out_dir / "bench.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def plot_alpha_over_training(evals: list[dict[str, Any]], path: Path) -> Path:
    """alpha at T=0 and T=1 (and tau) against training minutes."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    minutes = [e.get("train_seconds", 0.0) / 60 for e in evals]
    for key, style in (("alpha_t0", "o-"), ("alpha_t1", "s-")):
        axis.plot(minutes, [e.get(key) for e in evals], style, label=key)
    axis.set_xlabel("training minutes")
    axis.set_ylabel("alpha on held-out prompts")
    if any("tau" in e for e in evals):
        twin = axis.twinx()
        twin.plot(minutes, [e.get("tau") for e in evals], "^:", color="tab:green", label="tau")
        twin.set_ylabel("tau (tokens per target call)")
        twin.legend(loc="lower right", fontsize=8)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title("DistillSpec: draft/target agreement while training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_gamma_sweep(before: list[dict], after: list[dict], path: Path) -> Path:
    """tau and speed-up against gamma, before and after distillation."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows, style in (("before", before, "o--"), ("after", after, "o-")):
        gammas = [r["gamma"] for r in rows]
        left.plot(gammas, [r["block_efficiency"] for r in rows], style, label=label)
        right.plot(gammas, [r["speedup"] for r in rows], style, label=label)
    left.set_xlabel("gamma")
    left.set_ylabel("tau (tokens per target call)")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("gamma")
    right.set_ylabel("SD tokens/s ÷ target alone")
    for axis in (left, right):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_study_heatmap(rows: list[str], columns: list[str],
                       values: dict[tuple[str, str], tuple[float, float, str]], title: str,
                       path: Path) -> Path:
    """The paper's divergence × data heatmap: mean α per cell (colour and text), ± half the seed
    range, ★ on the winner and ≈ where within noise of it (``values[(row, column)] = (mean,
    spread, mark)``, mark "winner", "noise" or ""); grey where no cell finished."""
    import numpy as np

    plt = _pyplot()
    means = np.full((len(rows), len(columns)), np.nan)
    for (row, column), (mean, _, _) in values.items():
        means[rows.index(row), columns.index(column)] = mean
    figure, axis = plt.subplots(figsize=(1.6 * len(columns) + 2.5, 0.7 * len(rows) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = axis.imshow(np.ma.masked_invalid(means), cmap=cmap, aspect="auto")
    for (row, column), (mean, spread, mark) in values.items():
        symbol = {"winner": " ★", "noise": " ≈"}.get(mark, "")
        value = means[rows.index(row), columns.index(column)]
        middle = np.nanmin(means) + (np.nanmax(means) - np.nanmin(means)) / 2
        axis.text(columns.index(column), rows.index(row), f"{mean:.3f}{symbol}\n±{spread / 2:.3f}",
                  ha="center", va="center", fontsize=8,
                  color="black" if value >= middle else "white")
    axis.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel("data source")
    axis.set_ylabel("divergence")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, label="mean α over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


QUALITY_SPEED_AXES = (("speedup_vs_target", "SD tokens/s ÷ target alone"),
                      ("block_efficiency", "τ (tokens per target call)"))


def plot_quality_speed(curves: list[dict[str, Any]], target: dict[str, Any] | None,
                       metrics: list[tuple[str, Any]], title: str, path: Path) -> Path:
    """Lossy SD's trade-off for one draft: each quality metric (rows) against the speed-up over
    the target alone and against τ (columns), one line per lenience function from ε 1 (lossless)
    to its most lenient ε, each point labelled with its ε; the target alone as a star at 1×."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(metrics), 2, figsize=(11, 4 * len(metrics)), squeeze=False)
    for row, (label, quality) in enumerate(metrics):
        for column, (x_key, x_label) in enumerate(QUALITY_SPEED_AXES):
            axis = axes[row][column]
            for curve in curves:
                points = [p for p in curve["points"]
                          if p[x_key] is not None and quality(p) is not None]
                name = f"f_{curve['lenience']} ({curve['setting']})"
                xs, ys = [p[x_key] for p in points], [quality(p) for p in points]
                axis.plot(xs, ys, "o-", label=name)
                for point, x, y in zip(points, xs, ys):
                    axis.annotate(f"{point['epsilon']:g}", (x, y), fontsize=7,
                                  textcoords="offset points", xytext=(3, 3))
            if target is not None and column == 0 and quality(target) is not None:
                axis.plot([1.0], [quality(target)], "k*", markersize=11, label="target alone")
            axis.set_xlabel(x_label)
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(f"Lossy SD with the {title}: quality against speed (labels: ε)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
