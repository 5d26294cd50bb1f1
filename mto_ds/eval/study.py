"""The epoch-efficiency study: baseline and MTO run directories -> curves, numbers, report.

A run is known by what it wrote, not by its directory name: RUN/config.yaml says its method
(mto.enabled), seed and budget; RUN/metrics.jsonl holds its evaluation rows (`epoch` plus
`knn_top1`, `linear_top1`, ... ) and its training rows (`step`, `epoch`, `heterogeneity`);
RUN/final_eval.json, when present, one more evaluation row (written by `final_evaluation`).
The report made of a study is in study_report.py.

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
# Keys that may differ between a baseline and its MTO partner without making them incomparable
# (the memory and speed switches leave the gradients as they are: MTO may need checkpointing where
# the baseline does not).
INCIDENTAL = ("run.output_dir", "run.progress_bar", "run.log_every", "run.profile_", "data.num_workers", "checkpoint.",
              "eval.every_epochs", "eval.at_start", "eval.reconstructions", "mto.", "train.activation_checkpointing",
              "train.checkpoint_every", "train.compile")
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
    final_eval: Optional[dict] = None        # RUN/final_eval.json's row, when it was read
    final_eval_unused: Optional[str] = None  # why RUN/final_eval.json was not read (collect --final-eval
                                             # could not evaluate the run again: the row may be stale)

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


def read_final_eval(run_dir: Path) -> Optional[dict]:
    """RUN/final_eval.json's row; None when there is none, or it is not JSON (a file cut short by
    a kill before it was written atomically: warned, and then evaluated again)."""
    path = Path(run_dir) / FINAL_EVAL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{path}: not JSON (cut short?), left out; collect --final-eval evaluates the run again")
        return None


def read_config(path: Path) -> Dict[str, object]:
    return flatten_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def read_state(run_dir: Path) -> Optional[dict]:
    """RUN/state.json (the trainer writes it atomically when a start ends), or None."""
    path = Path(run_dir) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def says_finished(state: Optional[dict]) -> bool:
    """Only "finished": true counts: no state.json is a run killed hard (or still running)."""
    return bool(state) and state.get("finished") is True


def load_run(path: Path, final_eval: bool = True) -> Run:
    """The run in directory `path`; final_eval=False leaves RUN/final_eval.json out."""
    path = Path(path)
    config = read_config(path / "config.yaml")
    rows = _read_rows(path / "metrics.jsonl")
    final_row = read_final_eval(path) if final_eval else None
    if final_row:
        rows.append(final_row)

    evals: Dict[float, dict] = {}
    for row in rows:  # a resumed run may log an epoch twice: the later row replaces the earlier whole,
        parsed = _eval_row(row)  # so no epoch mixes the k-NN of one evaluation with the probe of another
        if parsed:
            evals[parsed["epoch"]] = parsed
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
               finished=finished, stop_reason=None if state is None else str(state.get("reason")),
               final_eval=final_row)


def load_runs(run_dirs: Iterable[Path], skipped: Optional[Dict[Path, str]] = None) -> List[Run]:
    """load_run of each directory; one in `skipped` (directory -> why `collect --final-eval` did not
    evaluate it) without its final_eval.json, which may be older than its training, and with why."""
    reasons = {Path(p).resolve(): why for p, why in (skipped or {}).items()}
    runs = []
    for run_dir in run_dirs:
        why = reasons.get(Path(run_dir).resolve())
        run = load_run(run_dir, final_eval=why is None)
        run.final_eval_unused = why
        runs.append(run)
    return runs


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
    seeds: List[int] = field(default_factory=list)   # the seeds averaged: both curves, complete
    # Seeds with both curves left out of the mean and std, with why (`incomplete_seeds`).
    excluded: Dict[int, str] = field(default_factory=dict)
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
    """The run's evaluations during training; an unfinished run's curve, or a finished one's that
    ends before its budget, is kept, and flagged."""
    curve = run.curve(metric)
    reason = unfinished_reason(run)
    if reason:
        ends = f"its curve ends at epoch {curve[0][-1]:g}" if curve[0] else "it has no curve"
        notes.append(f"{run.path}: {reason}; {ends}: {what_to_do(run)}")
    elif not curve[0]:
        notes.append(f"{run.path}: no {metric} evaluation during training; {final_eval_hint(metric)}")
    elif _ends_before_budget(run, curve):
        notes.append(f"{run.path}: finished at {run.budget:g} epochs, but its last {metric} evaluation is at epoch "
                     f"{curve[0][-1]:g}, so its final accuracy is not at its budget; {final_eval_hint(metric)}")
    return curve


def _ends_before_budget(run: Run, curve: Curve) -> bool:
    return bool(curve[0]) and not math.isclose(curve[0][-1], run.budget)


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
        elif _ends_before_budget(run, (epochs, values)):
            notes.append(f"{run.path}: last {metric} evaluation at epoch {epochs[-1]:g}, not at its budget "
                         f"{run.budget:g}; left out of the curve ({final_eval_hint(metric)} at its budget)")
        else:
            points.append((run.budget, values[-1]))
    # Every budget of a seed starts from the same initial encoder: its evaluation at epoch 0
    # (eval.at_start), in any of the runs, is the curve's budget-0 point.
    curves = (run.curve(metric) for run in sorted(group, key=lambda r: r.budget))
    at_start = next((values[0] for epochs, values in curves if epochs[:1] == [0.0]), None)
    if points and at_start is not None:
        points.insert(0, (0.0, at_start))
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
    _refuse_unlike_final_evals(runs, metric)

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

    notes += _pair_differences(partners) + _method_differences(runs) + _final_evals_not_used(runs)
    notes += _curves_of_two_settings(runs, metric)
    notes += _uninformative(curves, metric) + _no_gain_over_the_start(curves, metric)

    numbers: Dict[str, Dict[str, Optional[float]]] = {}
    for seed, by_method in sorted(curves.items()):
        if set(by_method) == set(METHODS):
            numbers[f"seed {seed}"] = compare_curves(*by_method["baseline"], *by_method["mto"])
            if numbers[f"seed {seed}"]["rauc"] is None:
                notes.append(f"seed {seed}: no RAUC; it needs two evaluation epochs both curves cover")
        else:
            notes.append(f"seed {seed}: only {', '.join(by_method)}; not compared")
    excluded = incomplete_seeds(groups, curves, mode, metric)
    notes += [f"seed {seed}: not in the mean or the std over seeds: {why}" for seed, why in sorted(excluded.items())]
    paired = sorted(seed for seed, by_method in curves.items() if set(by_method) == set(METHODS))
    complete = [seed for seed in paired if seed not in excluded]
    if paired and not complete:
        notes.append("no seed is complete (why: above): no mean over seeds; each seed's row is its own")
    mean_curves, std_counts = _over_seeds(curves, complete, numbers, notes)
    return Study(metric=metric, mode=mode, curves=curves, numbers=numbers, mean_curves=mean_curves,
                 runs=runs, warnings=notes, seeds=complete, std_counts=std_counts, excluded=excluded)


def _pair_differences(partners: Dict[Tuple[int, float], Dict[str, Run]]) -> List[str]:
    """A baseline and its MTO partner may differ only in MTO and incidental keys."""
    notes = []
    for (seed, _), pair in sorted(partners.items()):
        if len(pair) == 2:
            diffs = config_differences(pair["baseline"].config, pair["mto"].config, INCIDENTAL)
            if diffs:
                notes.append(f"seed {seed}: baseline and MTO differ beyond MTO: " + "; ".join(diffs))
    return notes


def _method_differences(runs: List[Run]) -> List[str]:
    """Runs of one method may differ only in seed, budget and incidental keys (MTO runs share their
    mto.* too): a budget from another sweep, or a seed on other data, would be averaged unseen."""
    ignore = RESUME_INCIDENTAL + ("train.epochs", "run.seed")
    notes = []
    for method in METHODS:
        same = sorted((r for r in runs if r.method == method), key=lambda r: (r.seed, r.budget, str(r.path)))
        for run in same[1:]:
            diffs = config_differences(same[0].config, run.config, ignore)
            if diffs:
                notes.append(f"{method} runs {same[0].path} and {run.path} differ beyond seed and budget: "
                             + "; ".join(diffs))
    return notes


def _uninformative(curves: Dict[int, Dict[str, Curve]], metric: str) -> List[str]:
    """A metric that cannot tell the encoders apart: every evaluation at 99 % or above, or all the
    same value (the demo's 10 synthetic classes: a random encoder scores 100 % there too)."""
    values = [v for by_method in curves.values() for _, vs in by_method.values() for v in vs]
    if len(values) < 2:
        return []
    if min(values) >= 99.0:
        why = f"every {metric} evaluation is at 99 % or above"
    elif min(values) == max(values):
        why = f"every {metric} evaluation is {values[0]:g} %"
    else:
        return []
    return [f"{why}: the metric is saturated and cannot tell the methods apart; use a harder evaluation "
            "set (more classes, docs/STUDY.md) and look at a random encoder's accuracy first"]


def _curves_of_two_settings(runs: List[Run], metric: str) -> List[str]:
    """Runs whose final_eval.json row was computed with other eval.* values (collect --set) than
    their config.yaml's, by which their evaluations during training (epoch 0 included) were: their
    curves mix the two."""
    notes = []
    for run in runs:
        section = ((run.final_eval or {}).get("settings") or {}).get("eval") or {}
        diffs = [f"eval.{key}: {run.config.get(f'eval.{key}')!r} vs {value!r}" for key, value in sorted(section.items())
                 if key not in ("every_epochs", "at_start") and run.config.get(f"eval.{key}") != value]
        if diffs and len(run.curve(metric)[0]) > 1:
            notes.append(f"{run.path}: its {FINAL_EVAL} was computed with other evaluation settings than its "
                         f"evaluations during training ({'; '.join(diffs)}, config.yaml vs {FINAL_EVAL}), so its "
                         f"{metric} curve mixes the two; set those values in the runs' config.yaml, or compare "
                         "final evaluations only (a budget study of runs with eval.every_epochs=0)")
    return notes


def _no_gain_over_the_start(curves: Dict[int, Dict[str, Curve]], metric: str) -> List[str]:
    """Curves whose final accuracy is no higher than their initial encoder's (epoch 0,
    eval.at_start): pre-training has not improved on a random encoder by this metric, so
    epochs-to-baseline measures nothing (it is 0: the start already reaches the target)."""
    notes = []
    for seed, by_method in sorted(curves.items()):
        for method, (epochs, values) in sorted(by_method.items()):
            if len(epochs) > 1 and epochs[0] == 0.0 and values[-1] <= values[0]:
                notes.append(f"seed {seed} {method}: {metric} {values[-1]:g} at epoch {epochs[-1]:g} is no higher than "
                             f"the initial encoder's {values[0]:g} (epoch 0): pre-training has not improved on a "
                             "random encoder by this metric")
    return notes


def _final_evals_not_used(runs: List[Run]) -> List[str]:
    notes = []
    for run in runs:
        if run.final_eval_unused:
            older = (f"its older {FINAL_EVAL} is not used" if (run.path / FINAL_EVAL).is_file()
                     else "it has no final evaluation")
            notes.append(f"{run.path}: final evaluation skipped ({run.final_eval_unused}); {older}")
    return notes


def _refuse_unlike_final_evals(runs: List[Run], metric: str) -> None:
    """The final_eval.json rows that give `metric`'s points must be computed with the same settings,
    but for the checkpoint and the seed (each run's own) and, unless the metric is the fine-tune,
    the fine-tune's length. A row without settings (an older file) is alike only to another such."""
    finetune = metric == "finetune_top1"
    ignore = ("checkpoint", "seed") + (() if finetune else ("finetune_epochs", "eval.finetune_"))
    rows = [r for r in sorted(runs, key=lambda r: (r.method, r.seed, r.budget, str(r.path)))
            if r.final_eval and r.final_eval.get(metric) is not None]
    for run in rows[1:]:
        first = rows[0]
        settings = [r.final_eval.get("settings") for r in (first, run)]
        if (settings[0] is None) != (settings[1] is None):
            older = first if settings[0] is None else run
            diffs = [f"{older.path}'s has no settings (written before they were recorded)"]
        else:
            diffs = config_differences(*(flatten_config(s or {}) for s in settings), ignore)
        if diffs:
            raise StudyError(f"{first.path} and {run.path}: their {FINAL_EVAL} rows of {metric} were computed "
                             f"with other evaluation settings ({'; '.join(diffs)}); {_how_to_align(diffs, finetune)}")


def _how_to_align(diffs: List[str], finetune: bool) -> str:
    """What evaluates runs whose final_eval.json rows differ in `diffs` ('key: a vs b') alike."""
    keys = [d.split(":", 1)[0] for d in diffs]
    if any(k.startswith("model.") for k in keys):
        return ("their runs pre-trained other models (the runs' config.yaml): they are not one study; "
                "collect the runs of one model")
    command = f"`tools/epoch_study.py collect --final-eval{' --finetune-epochs N' if finetune else ''}"
    from_configs = [k for k in keys if k.startswith(("eval.", "images."))]
    if from_configs:  # each run is evaluated with its own config.yaml's eval section
        return (f"{', '.join(from_configs)} come from the runs' own config.yaml: {command} --set eval.KEY=VALUE` "
                "(once per key) evaluates them all with the same values (eval.path for the images)")
    return f"{command}` evaluates them all alike, on this machine's device"


def incomplete_seeds(groups: Dict[Tuple[str, int], List[Run]], curves: Dict[int, Dict[str, Curve]],
                     mode: str, metric: str) -> Dict[int, str]:
    """Why each seed with both curves is incomplete, and so kept out of the mean and the std: in a
    periodic study a run of it unfinished, or finished with its last evaluation before its budget;
    in a budget study a method's curve without a point at a budget that the study's runs of that
    method have. Averaged in, it would compare a full schedule with one stopped part-way, or a mean
    curve shortened by one seed with a full one."""
    budgets = {method: {r.budget for (m, _), group in groups.items() if m == method for r in group}
               for method in METHODS}
    excluded = {}
    for seed, by_method in curves.items():
        if set(by_method) != set(METHODS):
            continue
        reasons = []
        for method in METHODS:
            group = groups[(method, seed)]
            if mode == "periodic":
                reasons += [f"{r.path.name} {unfinished_reason(r)}" for r in group if unfinished_reason(r)]
                reasons += [f"{r.path.name} last evaluated at epoch {by_method[method][0][-1]:g} of {r.budget:g}"
                            for r in group if not unfinished_reason(r) and _ends_before_budget(r, by_method[method])]
            else:
                reasons += [_no_point(method, budget, group, metric)
                            for budget in sorted(budgets[method] - set(by_method[method][0]))]
        if reasons:
            excluded[seed] = "; ".join(reasons)
    return excluded


def _no_point(method: str, budget: float, group: List[Run], metric: str) -> str:
    """Why the runs of one method and seed have no point at `budget`."""
    run = next((r for r in group if r.budget == budget), None)
    if run is None:
        return f"no {method} run with budget {budget:g}"
    reason = unfinished_reason(run)
    return f"{run.path.name} {reason}" if reason else f"{run.path.name} has no {metric} at its budget {budget:g}"


def _over_seeds(curves: Dict[int, Dict[str, Curve]], seeds: List[int], numbers: Dict[str, Dict[str, Optional[float]]],
                notes: List[str]) -> Tuple[Dict[str, Curve], Dict[str, int]]:
    """The mean curves over `seeds`, compared into numbers["mean"], and the sample std of those seeds'
    rows into numbers["std over seeds"]; returns the mean curves and how many seeds each std is over."""
    mean_curves: Dict[str, Curve] = {}
    for method in METHODS:
        mean = _mean_curve([curves[s][method] for s in seeds]) if seeds else None
        if mean:
            mean_curves[method] = mean
            dropped = sorted(set().union(*(curves[s][method][0] for s in seeds)) - set(mean[0]))
            if dropped:
                notes.append(f"{method} mean curve: epochs {', '.join(f'{e:g}' for e in dropped)} left out "
                             f"(not evaluated for every one of the seeds {', '.join(map(str, seeds))})")
    if len(mean_curves) == 2:
        numbers["mean"] = compare_curves(*mean_curves["baseline"], *mean_curves["mto"])
    per_seed = [numbers[f"seed {s}"] for s in seeds]
    std_counts: Dict[str, int] = {}
    if len(per_seed) > 1:  # the spread the mean hides: sample std over the seeds that have a value
        numbers["std over seeds"] = {}
        for key in per_seed[0]:
            if key.endswith("_is_bound"):  # flags, not numbers
                continue
            values = [n[key] for n in per_seed if n[key] is not None]
            numbers["std over seeds"][key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            std_counts[key] = len(values)
    return mean_curves, std_counts
