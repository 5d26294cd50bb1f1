"""The epoch-efficiency study's report: summary.md, summary.json and the two figures.

`write_report(study, out_dir)` writes them from an assembled `Study` (study.py); the numbers'
definitions, and what the report's rows and marks mean, are in docs/STUDY.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from .study import METHODS, Run, Study, unfinished_reason

# (key in the numbers, column title, format)
NUMBER_COLUMNS = (("rauc", "RAUC", ".4f"), ("baseline_final_top1", "baseline final", ".2f"),
                  ("baseline_final_epoch", "at epoch", "g"), ("mto_final_top1", "MTO final", ".2f"),
                  ("mto_final_epoch", "MTO final at epoch", "g"),
                  ("mto_minus_baseline_final_top1", "MTO − baseline final", "+.2f"),
                  ("mto_epochs_to_baseline", "MTO epochs to baseline final", ".2f"),
                  ("baseline_epochs_to_final", "baseline epochs to its final", ".2f"),
                  ("epoch_saving", "epoch saving", ".1f"))


def _cell(n: Dict[str, Optional[float]], key: str, spec: str, spread: bool) -> str:
    """One number of a row. An epoch reached at the curve's first evaluation is only a bound (the
    crossing is at or before it): '≤', and the epoch saving it gives '≥' or '≤' (docs/STUDY.md)."""
    value = n.get(key)
    if value is None:
        never = key == "mto_epochs_to_baseline" and not spread
        return f"never (to epoch {n['mto_final_epoch']:g})" if never else "n/a"
    if spread:
        return f"{100 * value:.1f} %" if key == "epoch_saving" else format(value, spec.lstrip("+"))
    if key == "epoch_saving":
        mto_bound, baseline_bound = n.get("mto_epochs_to_baseline_is_bound"), n.get("baseline_epochs_to_final_is_bound")
        if mto_bound and baseline_bound:
            return "n/a (both bounds)"
        # MTO's epochs at most those given: a saving at least as large; the baseline's: at most.
        return ("≥ " if mto_bound else "≤ " if baseline_bound else "") + f"{100 * value:.1f} %"
    return ("≤ " if n.get(f"{key}_is_bound") else "") + format(value, spec)


def _row_label(study: Study, name: str) -> str:
    seeds = len(study.seeds)
    if name == "mean":
        return f"mean of {seeds} seed{'s' * (seeds != 1)}"
    if name == "std over seeds":
        return f"std over {seeds} seeds"
    why = study.excluded.get(int(name.split()[1]))
    return f"{name} (not in the mean: {why})" if why else name


def _numbers_row(study: Study, name: str, n: Dict[str, Optional[float]]) -> str:
    """One row of the numbers table. The mean and std rows say how many seeds they are over, and
    a std cell over fewer seeds than that says how many; a curve that never reaches the baseline's
    final accuracy says so instead of n/a."""
    seeds = len(study.seeds)
    spread = name == "std over seeds"
    cells = [_row_label(study, name)]
    for key, _, spec in NUMBER_COLUMNS:
        count = study.std_counts.get(key, seeds) if spread else seeds
        cells.append(_cell(n, key, spec, spread) + (f" ({count} of {seeds})" if count < seeds else ""))
    return "| " + " | ".join(cells) + " |"


def summary_markdown(study: Study, curves_png: str, heat_png: str) -> str:
    metric = study.metric
    lines = [f"# Epoch-efficiency study: baseline vs MTO ({metric})", "",
             f"Curve kind: **{study.mode}** "
             + ("(accuracy evaluated every few epochs within each run)." if study.mode == "periodic"
                else "(final accuracy of runs with different epoch budgets)."),
             "Definitions (RAUC, epochs-to-baseline, epoch saving): docs/STUDY.md.", ""]
    if study.warnings:  # listed at the bottom, where a reader of the numbers might not look
        count = len(study.warnings)
        lines += [f"**{count} warning{'s' * (count != 1)}** (end of this page): the numbers below may not "
                  "mean what they say.", ""]
    lines += ["| | " + " | ".join(title for _, title, _ in NUMBER_COLUMNS) + " |",
              "|---|" + "---|" * len(NUMBER_COLUMNS)]
    for name, n in study.numbers.items():
        if not (name == "mean" and len(study.seeds) == 1):  # a mean of one seed is that seed's row
            lines.append(_numbers_row(study, name, n))
    lines += ["", f"![{metric} vs epoch]({curves_png})", "", f"![per-block heterogeneity]({heat_png})", "",
              f"## Curves ({metric}, %)", "", "| seed | method | epoch: accuracy |", "|---|---|---|"]
    for seed, by_method in sorted(study.curves.items()):
        for method, (epochs, values) in sorted(by_method.items()):
            points = ", ".join(f"{e:g}: {v:.2f}" for e, v in zip(epochs, values))
            lines.append(f"| {seed} | {method} | {points} |")
    lines += ["", "## Runs", "", "| run | method | seed | budget | epochs trained | finished |",
              "|---|---|---|---|---|---|"]
    for run in sorted(study.runs, key=lambda r: (r.seed, r.method, r.budget)):
        lines.append(f"| {run.path} | {run.method} | {run.seed} | {run.budget:g} | {run.trained:g} | "
                     f"{unfinished_reason(run) or 'yes'} |")
    if study.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in study.warnings]
    return "\n".join(lines) + "\n"


def heat_map_runs(study: Study) -> List[Run]:
    """One run per method for the heat-map: the lowest seed's longest run with telemetry."""
    chosen = []
    for method in METHODS:
        candidates = [r for r in study.runs if r.method == method and r.heterogeneity.size]
        if candidates:
            chosen.append(min(candidates, key=lambda r: (r.seed, -r.budget)))
    return chosen


def write_report(study: Study, out_dir: Path) -> Dict[str, Path]:
    """curves.png, heterogeneity.png, summary.md and summary.json in `out_dir`."""
    from .plots import plot_curves, plot_heterogeneity  # matplotlib only when a report is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("curves.png", "heterogeneity.png", "summary.md", "summary.json")}
    plot_curves(paths["curves.png"], study)
    plot_heterogeneity(paths["heterogeneity.png"], heat_map_runs(study))
    paths["summary.md"].write_text(summary_markdown(study, "curves.png", "heterogeneity.png"))
    paths["summary.json"].write_text(json.dumps({
        "metric": study.metric, "mode": study.mode, "numbers": study.numbers,
        "seeds": study.seeds, "excluded_seeds": {str(s): why for s, why in study.excluded.items()},
        "std_counts": study.std_counts,
        "curves": {str(s): {m: {"epochs": c[0], "values": c[1]} for m, c in by.items()}
                   for s, by in study.curves.items()},
        "runs": [{"path": str(r.path), "method": r.method, "seed": r.seed, "budget": r.budget,
                  "trained": r.trained, "finished": r.finished, "unfinished": unfinished_reason(r),
                  "final_eval_unused": r.final_eval_unused}
                 for r in study.runs],
        "warnings": study.warnings}, indent=1))
    return paths
