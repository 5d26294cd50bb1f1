"""The study's two figures: accuracy-vs-epoch curves, and per-block heterogeneity over training.

Drawn on matplotlib Figure objects with the Agg canvas, never pyplot, so importing this
module changes no global backend in the caller's process.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = {"baseline": "tab:blue", "mto": "tab:orange"}
LABELS = {"baseline": "baseline", "mto": "MTO"}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_curves(path: Path, study) -> None:
    """Each seed's curve thin, the mean over seeds bold; the baseline's final accuracy and the
    epoch MTO reaches it marked. A seed left out of the mean (incomplete) is drawn dashed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    several = len(study.curves) > 1
    for seed, by_method in sorted(study.curves.items()):
        excluded = seed in study.excluded
        for method, (epochs, values) in by_method.items():
            label = None if several else LABELS[method]
            if excluded:
                label = f"{LABELS[method]}, seed {seed} (not in the mean)"
            ax.plot(epochs, values, marker="o", ms=3, color=COLORS[method], lw=1 if several else 2,
                    alpha=0.45 if several else 1.0, ls="--" if excluded else "-", label=label)
    if several:
        seeds = len(study.seeds)  # the complete seeds with both curves: those averaged
        for method, (epochs, values) in study.mean_curves.items():
            ax.plot(epochs, values, marker="o", color=COLORS[method], lw=2.5,
                    label=f"{LABELS[method]} (mean of {seeds} seed{'s' * (seeds != 1)})")
    numbers = study.numbers.get("mean")
    if numbers:
        ax.axhline(numbers["baseline_final_top1"], color=COLORS["baseline"], ls="--", lw=0.8,
                   label="baseline final accuracy")
        if numbers["mto_epochs_to_baseline"] is not None:
            ax.axvline(numbers["mto_epochs_to_baseline"], color=COLORS["mto"], ls=":", lw=1,
                       label=f"MTO reaches it: epoch {numbers['mto_epochs_to_baseline']:.1f}")
        rauc = numbers["rauc"]
        ax.set_title(f"{study.metric}: RAUC {rauc:.3f}" if rauc is not None else study.metric)
    else:
        ax.set_title(study.metric)
    ax.set_xlabel("pre-training epochs" + (" (budget of each run)" if study.mode == "budget" else ""))
    ax.set_ylabel(f"{study.metric} (%)")
    ax.grid(alpha=0.3)
    if study.curves:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {study.metric} evaluations in these runs", ha="center", va="center",
                transform=ax.transAxes)
    _save(fig, path)


def bin_rows(epochs: np.ndarray, matrix: np.ndarray, max_columns: int) -> Tuple[np.ndarray, np.ndarray]:
    """Consecutive logged rows averaged into at most `max_columns` groups (NaN-aware)."""
    if len(epochs) <= max_columns:
        return epochs, matrix
    groups = np.array_split(np.arange(len(epochs)), max_columns)
    with warnings.catch_warnings():  # a block with no value in a whole group stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.array([epochs[g].mean() for g in groups]),
                np.stack([np.nanmean(matrix[g], axis=0) for g in groups]))


def _edges(centres: np.ndarray) -> np.ndarray:
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def plot_heterogeneity(path: Path, runs: List, max_columns: int = 300) -> None:
    """One panel per run: block (rows) x training epoch (columns), one colour scale for all."""
    runs = [r for r in runs if r.heterogeneity.size]
    fig = Figure(figsize=(8, 2.2 + 2.2 * max(1, len(runs))))
    if not runs:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no heterogeneity telemetry in these runs", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    binned = [bin_rows(r.het_epochs, r.heterogeneity, max_columns) for r in runs]
    finite = np.concatenate([m[np.isfinite(m)] for _, m in binned]) if binned else np.zeros(0)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, run, (epochs, matrix) in zip(axes, runs, binned):
        blocks = matrix.shape[1]
        image = ax.pcolormesh(_edges(epochs), np.arange(blocks + 1) - 0.5, np.ma.masked_invalid(matrix.T),
                              cmap="viridis", vmin=vmin, vmax=vmax, shading="flat")
        ax.set_ylim(blocks - 0.5, -0.5)  # block 0 (the earliest) on top
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("block (sees mask tokens)")
        ax.set_title(f"{LABELS.get(run.method, run.method)}, seed {run.seed}: {run.path.name}", fontsize=9)
    axes[-1].set_xlabel("pre-training epoch")
    fig.colorbar(image, ax=list(axes), label="heterogeneity h_l")
    _save(fig, path)
