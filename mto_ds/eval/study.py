"""The epoch-efficiency study: baseline and MTO run directories -> curves, numbers, report.

A run is known by what it wrote, not by its directory name: RUN/config.yaml says its method
(mto.enabled), seed and budget; RUN/metrics.jsonl holds its evaluation rows (`epoch` plus
`knn_top1`, `linear_top1`, ... ) and its training rows (`step`, `epoch`, `heterogeneity`);
RUN/final_eval.json, when present, one more evaluation row (written by `final_evaluation`).

Two kinds of curve (docs/STUDY.md):
- periodic: one run per method and seed, evaluated every E epochs during pre-training;
- budget: several runs per method and seed with different train.epochs (the SLURM sweep),
  each contributing its final accuracy at its budget, as the paper's curves are made.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import OmegaConf

from ..config import flatten_config
from .rauc import compare_curves

METHODS = ("baseline", "mto")
METRICS = ("knn_top1", "linear_top1", "finetune_top1")
FINAL_EVAL = "final_eval.json"
# What the study itself sets for each run; extra overrides may not touch these.
CONTROLLED_KEYS = ("mto.enabled", "run.output_dir", "run.seed", "train.epochs", "train.steps", "eval.every_epochs")
# Keys that may differ between a baseline and its MTO partner without making them incomparable.
INCIDENTAL = ("run.output_dir", "run.progress_bar", "run.log_every", "data.num_workers", "checkpoint.",
              "eval.every_epochs", "mto.")
# Keys a run may be resumed with changed without changing what its numbers mean (mto.* does).
RESUME_INCIDENTAL = tuple(key for key in INCIDENTAL if key != "mto.")
RESUME = "resume it by running the same command again, then collect again"


class StudyError(ValueError):
    """A study that cannot be launched or assembled as asked; the message names the problem."""

Curve = Tuple[List[float], List[float]]


@dataclass
class Run:
    path: Path
    method: str                              # baseline | mto
    seed: int
    budget: float                            # its schedule's epochs: a finished run's last training row,
                                             # else train.epochs
    config: Dict[str, object]                # flattened: {"train.epochs": 100, ...}
    evals: List[dict] = field(default_factory=list)    # by epoch, one row per epoch
    het_epochs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heterogeneity: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [rows, blocks]
    finished: bool = False                   # only state.json's "finished": true counts
    stop_reason: Optional[str] = None        # state.json's "reason"; None when there is no state.json

    @property
    def trained(self) -> float:
        """Epochs trained: the last training row's (0 when none was logged)."""
        return float(self.het_epochs[-1]) if self.het_epochs.size else 0.0

    def curve(self, metric: str) -> Curve:
        points = [(row["epoch"], row[metric]) for row in self.evals if row.get(metric) is not None]
        return [float(e) for e, _ in points], [float(v) for _, v in points]


def unfinished_reason(run: Run) -> Optional[str]:
    """Why `run` does not count as finished, with what was trained; None when it finished."""
    if run.finished:
        return None
    trained = f"{run.trained:g} of {run.budget:g} epochs trained" if run.trained else "nothing trained"
    if run.stop_reason is None:
        return f"unfinished: no state.json (killed hard, or still running), {trained}"
    if run.stop_reason.startswith("set-up failed"):
        return f"set-up failed (state.json: {run.stop_reason}), {trained}"
    return f"unfinished (state.json: {run.stop_reason}), {trained}"


def evaluated_at_budget(run: Run) -> bool:
    return bool(run.evals) and math.isclose(run.evals[-1]["epoch"], run.budget)


def final_eval_hint(metric: str) -> str:
    finetune = " --finetune-epochs N" if metric == "finetune_top1" else ""
    return f"`tools/epoch_study.py collect --final-eval{finetune}` evaluates its last checkpoint"


# --- reading run directories ---------------------------------------------------------------
def _read_rows(path: Path) -> List[dict]:
    rows = []
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill mid-write: the rest is still good
                    warnings.warn(f"{path}:{number}: not JSON, skipped")
    return rows


def _eval_row(row: dict) -> Optional[dict]:
    """{'epoch', metric: value, ...} of a row carrying evaluation results ('eval/' prefixes accepted)."""
    found = {m: row.get(m, row.get(f"eval/{m}")) for m in METRICS}
    found = {m: float(v) for m, v in found.items() if v is not None}
    if not found or row.get("epoch") is None:
        return None
    return {"epoch": float(row["epoch"]), **found}


def read_config(path: Path) -> Dict[str, object]:
    return flatten_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def read_state(run_dir: Path) -> Optional[dict]:
    """RUN/state.json (the trainer writes it atomically when a start ends), or None."""
    path = Path(run_dir) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def says_finished(state: Optional[dict]) -> bool:
    """Only "finished": true counts: no state.json is a run killed hard (or still running)."""
    return bool(state) and state.get("finished") is True


def load_run(path: Path) -> Run:
    path = Path(path)
    config = read_config(path / "config.yaml")
    rows = _read_rows(path / "metrics.jsonl")
    if (path / FINAL_EVAL).is_file():
        rows.append(json.loads((path / FINAL_EVAL).read_text()))

    evals: Dict[float, dict] = {}
    for row in rows:  # a resumed run may log an epoch twice: the later row wins
        parsed = _eval_row(row)
        if parsed:
            evals.setdefault(parsed["epoch"], {}).update(parsed)
    train = {}
    for row in rows:
        if isinstance(row.get("heterogeneity"), list) and "step" in row:
            train[row["step"]] = row
    steps = sorted(train)
    width = max((len(train[s]["heterogeneity"]) for s in steps), default=0)
    het = np.full((len(steps), width), np.nan)
    for i, s in enumerate(steps):
        values = [np.nan if v is None else v for v in train[s]["heterogeneity"]]
        het[i, :len(values)] = values
    het_epochs = np.array([float(train[s].get("epoch", s)) for s in steps])

    state = read_state(path)
    finished = says_finished(state)  # else what it trained is no budget
    budget = float(het_epochs[-1]) if finished and len(steps) else float(config.get("train.epochs", 0))
    return Run(path=path, method="mto" if config.get("mto.enabled") else "baseline",
               seed=int(config.get("run.seed", 0)), budget=budget, config=config,
               evals=[evals[e] for e in sorted(evals)], het_epochs=het_epochs, heterogeneity=het,
               finished=finished, stop_reason=None if state is None else str(state.get("reason")))


def find_run_dirs(paths: Iterable[Path]) -> List[Path]:
    """Each path that is a run directory (has config.yaml), or the run directories below it;
    a run reached twice (`STUDY STUDY/RUN`) is listed once."""
    paths = [Path(p) for p in paths]
    found: Dict[Path, Path] = {}  # resolved -> as given
    for path in paths:
        if (path / "config.yaml").is_file():
            below = [path]
        elif path.is_dir():
            # Only the parts below `path`: a study kept under any folder named checkpoints still counts.
            below = sorted(p.parent for p in path.rglob("config.yaml")
                           if "checkpoints" not in p.relative_to(path).parts)
        else:
            raise StudyError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}: "
                             "give run directories or directories holding them")
        for run_dir in below:
            found.setdefault(run_dir.resolve(), run_dir)
    if not found:
        raise StudyError(f"no run directories (with config.yaml) under {', '.join(map(str, paths))}")
    return list(found.values())


# --- assembling the study ------------------------------------------------------------------
@dataclass
class Study:
    metric: str
    mode: str                                   # periodic | budget
    curves: Dict[int, Dict[str, Curve]]         # seed -> method -> curve
    numbers: Dict[str, Dict[str, Optional[float]]]   # "seed S" and "mean" -> compare_curves(...)
    mean_curves: Dict[str, Curve]
    runs: List[Run]
    warnings: List[str]
    seeds: List[int] = field(default_factory=list)   # the seeds with both curves: compared, averaged
    # How many of `seeds` each "std over seeds" number is over: a seed where MTO never reached
    # the baseline has no epochs-to-baseline, and leaving it out silently would narrow the spread.
    std_counts: Dict[str, int] = field(default_factory=dict)


def config_differences(a: Dict[str, object], b: Dict[str, object], ignore: Sequence[str] = ()) -> List[str]:
    """'key: a vs b' for each key whose values differ, except keys starting with an `ignore` entry."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k.startswith(i) for i in ignore)]


def _mean_curve(curves: List[Curve]) -> Optional[Curve]:
    """Mean over seeds at the epochs every seed evaluated."""
    common = sorted(set.intersection(*(set(c[0]) for c in curves)))
    if not common:
        return None
    lookups = [dict(zip(*c)) for c in curves]
    return common, [float(np.mean([lk[e] for lk in lookups])) for e in common]


def what_to_do(run: Run) -> str:
    """What makes an unfinished run count: resume it, or first fix what failed in its set-up."""
    if (run.stop_reason or "").startswith("set-up failed"):
        return "fix what failed, then run the same command again"
    return RESUME


def _periodic_curve(run: Run, metric: str, notes: List[str]) -> Curve:
    """The run's evaluations during training; an unfinished run's curve is kept, and flagged."""
    curve = run.curve(metric)
    reason = unfinished_reason(run)
    if reason:
        ends = f"its curve ends at epoch {curve[0][-1]:g}" if curve[0] else "it has no curve"
        notes.append(f"{run.path}: {reason}; {ends}: {what_to_do(run)}")
    elif not curve[0]:
        notes.append(f"{run.path}: no {metric} evaluation during training; {final_eval_hint(metric)}")
    return curve


def _budget_curve(group: List[Run], metric: str, notes: List[str]) -> Curve:
    """Each finished run's accuracy at its budget. Only a whole schedule gives a budget's point: a
    run stopped part-way (mid-schedule learning rate, fewer epochs) would pass for a shorter one."""
    finished = []
    for run in sorted(group, key=lambda r: r.budget):
        reason = unfinished_reason(run)
        if reason:
            notes.append(f"{run.path}: {reason}; left out of the budget curve (an accuracy mid-schedule is "
                         f"not a shorter budget's): {what_to_do(run)}")
        else:
            finished.append(run)
    budgets = [r.budget for r in finished]
    if len(set(budgets)) < len(budgets):
        raise StudyError(f"two {group[0].method} runs with seed {group[0].seed} share a budget: "
                         f"{', '.join(f'{r.path} ({r.budget:g})' for r in finished)}; collect one study "
                         "at a time, or name the runs to compare")
    points = []
    for run in finished:
        epochs, values = run.curve(metric)
        if not values:
            notes.append(f"{run.path}: no {metric} evaluation; left out of the curve ({final_eval_hint(metric)})")
        elif not math.isclose(epochs[-1], run.budget):
            notes.append(f"{run.path}: last {metric} evaluation at epoch {epochs[-1]:g}, not at its budget "
                         f"{run.budget:g}; left out of the curve ({final_eval_hint(metric)} at its budget)")
        else:
            points.append((run.budget, values[-1]))
    return [p[0] for p in points], [p[1] for p in points]


def assemble(runs: List[Run], metric: str = "knn_top1", mode: str = "auto") -> Study:
    if metric not in METRICS:
        raise StudyError(f"metric must be one of {METRICS}, got {metric!r}")
    notes: List[str] = []
    groups: Dict[Tuple[str, int], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.seed), []).append(run)
    if mode == "auto":
        mode = "budget" if any(len(g) > 1 for g in groups.values()) else "periodic"
    if mode not in ("periodic", "budget"):
        raise StudyError(f"mode must be auto, periodic or budget, got {mode!r}")

    curves: Dict[int, Dict[str, Curve]] = {}
    partners: Dict[Tuple[int, float], Dict[str, Run]] = {}
    for (method, seed), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if mode == "periodic" and len(group) > 1:
            raise StudyError(f"{len(group)} {method} runs with seed {seed} ({', '.join(str(r.path) for r in group)}); "
                             "a periodic curve has one per method and seed: for a sweep of budgets use "
                             "--curve budget (or auto)")
        curve = _periodic_curve(group[0], metric, notes) if mode == "periodic" else _budget_curve(group, metric, notes)
        for run in group:
            partners.setdefault((seed, run.budget if mode == "budget" else 0.0), {})[method] = run
        if curve[0]:
            curves.setdefault(seed, {})[method] = curve

    for (seed, _), pair in sorted(partners.items()):
        if len(pair) == 2:
            diffs = config_differences(pair["baseline"].config, pair["mto"].config, INCIDENTAL)
            if diffs:
                notes.append(f"seed {seed}: baseline and MTO differ beyond MTO: " + "; ".join(diffs))

    numbers: Dict[str, Dict[str, Optional[float]]] = {}
    for seed, by_method in sorted(curves.items()):
        if set(by_method) == set(METHODS):
            numbers[f"seed {seed}"] = compare_curves(*by_method["baseline"], *by_method["mto"])
            if numbers[f"seed {seed}"]["rauc"] is None:
                notes.append(f"seed {seed}: no RAUC; it needs two evaluation epochs both curves cover")
        else:
            notes.append(f"seed {seed}: only {', '.join(by_method)}; not compared")
    mean_curves: Dict[str, Curve] = {}
    paired = [s for s, by_method in curves.items() if set(by_method) == set(METHODS)]
    for method in METHODS:
        mean = _mean_curve([curves[s][method] for s in paired]) if paired else None
        if mean:
            mean_curves[method] = mean
            dropped = sorted(set().union(*(curves[s][method][0] for s in paired)) - set(mean[0]))
            if dropped:
                notes.append(f"{method} mean curve: epochs {', '.join(f'{e:g}' for e in dropped)} left out "
                             f"(not evaluated for every one of the seeds {', '.join(map(str, paired))})")
    if len(mean_curves) == 2:
        numbers["mean"] = compare_curves(*mean_curves["baseline"], *mean_curves["mto"])
    per_seed = [n for name, n in numbers.items() if name.startswith("seed ")]
    std_counts: Dict[str, int] = {}
    if len(per_seed) > 1:  # the spread the mean hides: sample std over the seeds that have a value
        numbers["std over seeds"] = {}
        for key in per_seed[0]:
            values = [n[key] for n in per_seed if n[key] is not None]
            numbers["std over seeds"][key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            std_counts[key] = len(values)
    return Study(metric=metric, mode=mode, curves=curves, numbers=numbers, mean_curves=mean_curves,
                 runs=runs, warnings=notes, seeds=sorted(paired), std_counts=std_counts)


# --- the report ----------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


NUMBER_COLUMNS = (("rauc", ".4f"), ("baseline_final_top1", ".2f"), ("baseline_final_epoch", "g"),
                  ("mto_final_top1", ".2f"), ("mto_epochs_to_baseline", ".2f"),
                  ("baseline_epochs_to_final", ".2f"), ("epoch_saving", ".1f"))


def _numbers_row(study: Study, name: str, n: Dict[str, Optional[float]]) -> str:
    """One row of the numbers table. The mean and std rows say how many seeds they are over, and
    a std cell over fewer seeds than that says how many; a curve that never reaches the baseline's
    final accuracy says so instead of n/a."""
    seeds = len(study.seeds)
    spread = name == "std over seeds"
    label = {"mean": f"mean of {seeds} seed{'s' * (seeds != 1)}",
             "std over seeds": f"std over {seeds} seeds"}.get(name, name)
    cells = [label]
    for key, spec in NUMBER_COLUMNS:
        value = n[key]
        if key == "epoch_saving" and value is not None:
            text = f"{100 * value:.1f} %"
        elif key == "mto_epochs_to_baseline" and value is None and not spread:
            text = f"never (to epoch {n['mto_final_epoch']:g})"
        else:
            text = _fmt(value, spec)
        count = study.std_counts.get(key, seeds) if spread else seeds
        cells.append(text + (f" ({count} of {seeds})" if count < seeds else ""))
    return "| " + " | ".join(cells) + " |"


def summary_markdown(study: Study, curves_png: str, heat_png: str) -> str:
    metric = study.metric
    lines = [f"# Epoch-efficiency study: baseline vs MTO ({metric})", "",
             f"Curve kind: **{study.mode}** "
             + ("(accuracy evaluated every few epochs within each run)." if study.mode == "periodic"
                else "(final accuracy of runs with different epoch budgets)."),
             "Definitions (RAUC, epochs-to-baseline, epoch saving): docs/STUDY.md.", "",
             "| | RAUC | baseline final | at epoch | MTO final | MTO epochs to baseline final | "
             "baseline epochs to its final | epoch saving |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n in study.numbers.items():
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
        "seeds": study.seeds, "std_counts": study.std_counts,
        "curves": {str(s): {m: {"epochs": c[0], "values": c[1]} for m, c in by.items()}
                   for s, by in study.curves.items()},
        "runs": [{"path": str(r.path), "method": r.method, "seed": r.seed, "budget": r.budget,
                  "trained": r.trained, "finished": r.finished, "unfinished": unfinished_reason(r)}
                 for r in study.runs],
        "warnings": study.warnings}, indent=1))
    return paths
