"""Launching a study's runs, and evaluating them after training (docs/STUDY.md).

`plan_runs` turns the study's options into one pre-training command per (method, seed, budget);
`run_study` runs them one after the other, passing the driver's stop signals on to the trainer
(`ChildRunner`); `final_evaluation` evaluates a finished run's last checkpoint into
RUN/final_eval.json. tools/epoch_study.py is the command line around them.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from ..config import flatten_config
from .study import (CONTROLLED_KEYS, FINAL_EVAL, METHODS, METRICS, RESUME_INCIDENTAL, StudyError, config_differences,
                    evaluated_at_budget, load_run, read_config, read_final_eval, read_state, says_finished,
                    unfinished_reason, what_to_do)


@dataclass(frozen=True)
class PlannedRun:
    name: str
    run_dir: Path
    argv: List[str]
    config: str = ""                         # --config; with `overrides`, what the trainer loads
    overrides: Tuple[str, ...] = ()


def default_eval_every(epochs: int) -> int:
    """About ten evaluations per run for any budget: budget / 10 rounded half up, at least 1.

    A single E can evaluate the last epoch only where it divides the budget, and a prime budget
    has no divisor near budget / 10; where E does not divide it, the study evaluates the last
    checkpoint after training instead (`evaluated_at_budget`, `final_evaluation`)."""
    return max(1, (epochs + 5) // 10)


def _refuse_repeats(option: str, values: Sequence[int]) -> None:
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise StudyError(f"{option} {' '.join(map(str, repeated))} given more than once: each budget and seed is "
                         "one run directory, which two runs (or SLURM array elements) would train at once")


def plan_runs(config: str, out_dir: Path, *, epochs: Sequence[int], seeds: Sequence[int],
              eval_every: Optional[int] = None, overrides: Sequence[str] = (),
              launcher: Optional[str] = None, curve: str = "auto") -> List[PlannedRun]:
    """The pre-training commands of a study, baseline and MTO neighbours per (seed, budget).

    Run directories are named as slurm/sweep.sbatch names them: <method>-ep<epochs>-s<seed>.
    `launcher` replaces the Python interpreter, e.g. "torchrun --nproc_per_node 2" or
    "srun python"; with DeepSpeed's launcher the module flag is --module. `curve` is the
    report's (--curve): refused here, before any training, when the runs cannot make it.
    """
    if not epochs or not seeds:
        raise StudyError(f"no {'budget (--epochs)' if not epochs else 'seed (--seeds)'} given")
    if curve == "periodic" and len(epochs) > 1:
        raise StudyError(f"--curve periodic takes one budget, got --epochs {' '.join(map(str, epochs))}: a periodic "
                         "curve is one run per method and seed; several budgets make a budget curve (--curve "
                         "budget or auto)")
    bad = [e for e in epochs if e <= 0]
    if bad:
        raise StudyError(f"--epochs must be whole numbers of epochs >= 1, got {' '.join(map(str, bad))}")
    _refuse_repeats("--epochs", epochs)
    _refuse_repeats("--seeds", seeds)
    if eval_every is not None and eval_every <= 0:
        raise StudyError(f"--eval-every must be >= 1 (epochs between evaluations), got {eval_every}; "
                         "leave it out for about ten evaluations per run")
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in CONTROLLED_KEYS:
            raise StudyError(f"override '{item}' sets {key}, which the study controls "
                             f"(use the study's own options for {', '.join(CONTROLLED_KEYS)})")
    uneven = [budget for budget in epochs if eval_every and budget % eval_every]
    if uneven:
        raise StudyError(f"--eval-every {eval_every} does not divide the budget {' '.join(map(str, uneven))}: its "
                         "last epoch would not be evaluated during training; give a divisor, or leave it out")
    _refuse_steps(config, overrides)
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    module_flag = "--module" if Path(prefix[0]).name == "deepspeed" else "-m"
    planned = []
    for seed in seeds:
        for budget in epochs:
            every = eval_every or default_eval_every(budget)
            for method in METHODS:
                name = f"{method}-ep{budget}-s{seed}"
                run_dir = Path(out_dir) / name
                settings = (f"mto.enabled={'true' if method == 'mto' else 'false'}", f"run.output_dir={run_dir}",
                            f"run.seed={seed}", f"train.epochs={budget}", f"eval.every_epochs={every}",
                            "eval.at_start=true", *overrides)
                argv = [*prefix, module_flag, "mto_ds", "pretrain", "--config", str(config), *settings]
                planned.append(PlannedRun(name, run_dir, argv, str(config), settings))
    return planned


def _refuse_steps(config: str, overrides: Sequence[str]) -> None:
    """train.steps wins over train.epochs: set in the config (file or its _base_), it would give
    every budget the same length."""
    from mto_ds.config import load_config

    steps = load_config(config, overrides).train.steps
    if steps is not None:
        raise StudyError(f"{config} sets train.steps={steps}, which overrides every budget (--epochs): use a "
                         "config without train.steps (null) for a study")


def resume_conflicts(planned: PlannedRun) -> List[str]:
    """How the run already in `planned.run_dir` was set up differently from what `planned` would
    run (config_differences; a resume may change RESUME_INCIDENTAL keys); empty when no run is there.
    Keys only one of the two configs has (the schema changed between them) are not compared.
    Loading what `planned` would run validates it: a bad override is a ConfigError before any run."""
    from mto_ds.config import load_config, to_yaml

    # Through YAML, as the trainer writes RUN/config.yaml, so equal settings compare equal.
    wanted = flatten_config(OmegaConf.to_container(
        OmegaConf.create(to_yaml(load_config(planned.config, planned.overrides))), resolve=True))
    existing_path = planned.run_dir / "config.yaml"
    if not existing_path.is_file():
        return []
    existing = read_config(existing_path)
    common = set(existing) & set(wanted)
    return config_differences({k: existing[k] for k in common}, {k: wanted[k] for k in common}, RESUME_INCIDENTAL)


# Where final_evaluation keeps each row it replaces, one JSON row a line.
SUPERSEDED_FINAL_EVALS = "final_eval.superseded.jsonl"


def final_evaluation(run_dir: Path, finetune_epochs: int = 0, device=None, overrides: Sequence[str] = ()) -> dict:
    """Evaluates a finished run's last checkpoint (fine-tune too if asked) into RUN/final_eval.json,
    with RUN/config.yaml's settings after `overrides` (`eval.*` and `data.num_workers`, checked by
    `check_eval_overrides`).

    The row keeps what it was computed from (`run.evaluation_settings`) and is reused only while
    that is what an evaluation now would use, so a study is collected again cheaply, never stale.
    """
    from mto_ds.config import load_config

    from .run import evaluation_settings, run_eval

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    reason = unfinished_reason(run)
    if reason:  # its last checkpoint is from part-way through the schedule, not at its budget
        raise RuntimeError(f"{run_dir}: {reason}; not evaluated as if at its budget of {run.budget:g} epochs: "
                           f"{what_to_do(run)}")
    cfg = load_config(run_dir / "config.yaml", overrides, training=False)
    # Through JSON, as the cached row holds them, so equal settings compare equal.
    settings = json.loads(json.dumps(evaluation_settings(cfg, str(run_dir), finetune_epochs, device)))
    cached = run_dir / FINAL_EVAL
    row = read_final_eval(run_dir) or {}
    # Checkpoints pruned or deleted since: a row of the same other settings still counts.
    checkpoint_gone = settings["checkpoint"] is None
    if row and _reusable(row, settings, compare_checkpoint=not checkpoint_gone):
        if checkpoint_gone:
            warnings.warn(f"{run_dir} has no complete checkpoint left; using its {FINAL_EVAL} of checkpoint "
                          f"{row['settings']['checkpoint']}")
        return row
    if checkpoint_gone:
        raise RuntimeError(f"{run_dir} has no complete checkpoint to evaluate, and no {FINAL_EVAL} "
                           "computed with the same evaluation settings")
    result = run_eval(cfg, str(run_dir), finetune_epochs, device=device)
    if row:  # of other settings (a GPU fine-tune, say, before a collect on another device): kept
        with open(run_dir / SUPERSEDED_FINAL_EVALS, "a") as superseded:
            superseded.write(json.dumps(row) + "\n")
    row = {"epoch": run.budget, **result, "settings": settings}
    # Whole or not at all: a collect killed mid-write must not leave a row every later one trips on.
    partial = cached.with_name(f".{FINAL_EVAL}.partial")
    partial.write_text(json.dumps(row))
    partial.replace(cached)
    return row


# What a collect may change in the runs' configs for their final evaluation: how they are
# evaluated (e.g. eval.path for runs pre-trained on an FFCV file) and with how many loader
# workers, never what was pre-trained.
EVAL_OVERRIDE_PREFIXES = ("eval.", "data.num_workers=")


def check_eval_overrides(overrides: Sequence[str]) -> None:
    """A StudyError naming an override that is not `eval.*` or `data.num_workers`, and the
    ConfigError of one the schema refuses, before any run is evaluated (a run's own config.yaml
    that no longer loads is that run's problem: it is skipped, named)."""
    from mto_ds.config import load_config

    bad = [item for item in overrides if "=" not in item or not item.startswith(EVAL_OVERRIDE_PREFIXES)]
    if bad:
        raise StudyError(f"--set takes eval.KEY=VALUE or data.num_workers=N (how the runs are evaluated, not what "
                         f"they pre-trained), got {' '.join(bad)}")
    if overrides:
        load_config(None, overrides, training=False)


def _reusable(row: dict, settings: dict, compare_checkpoint: bool = True) -> bool:
    """Whether a cached row holds what `settings` asks for, computed from them. A row with a
    fine-tune also serves a request for none: its other numbers do not depend on the fine-tune."""
    done, asked = row.get("settings") or {}, settings["finetune_epochs"]
    compared = [key for key in settings if key != "finetune_epochs" and (compare_checkpoint or key != "checkpoint")]
    same = all(done.get(key) == settings[key] for key in compared)
    metrics = {"knn_top1", "linear_top1"} | ({"finetune_top1"} if asked else set())
    return same and metrics <= set(row) and (asked == 0 or done.get("finetune_epochs") == asked)


# --- running them -------------------------------------------------------------------------
# SIGHUP too: the trainer runs in its own process group (below), so a closed terminal reaches it
# only through here, as before.
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
# Its own process group: a Ctrl-C at the terminal then reaches the trainer once, passed on by the
# driver, not twice (torchrun's clean-up would be cut short by the second).
OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


class ChildRunner:
    """Runs one command at a time and passes the driver's stop signals on to it, so that killing
    the study never leaves a trainer running on its own (and a second one started beside it)."""

    def __init__(self):
        self.signum: Optional[int] = None    # the first signal received: no command starts after it
        self.child: Optional[subprocess.Popen] = None
        self._unsent: Optional[int] = None   # arrived while a child was being started
        self._previous = {}

    def __enter__(self) -> "ChildRunner":
        for sig in FORWARDED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.child is not None and self.child.returncode is None:
            self.child.send_signal(signum)
        else:
            self._unsent = signum

    def run(self, argv: List[str]) -> int:
        """The command's exit code, once it has exited; every signal received meanwhile is passed on."""
        self._unsent = None
        self.child = subprocess.Popen(argv, **OWN_GROUP)
        if self._unsent:
            self.child.send_signal(self._unsent)
        return self.child.wait()


def evaluate_last_checkpoints(run_dirs, finetune_epochs: int, overrides: Sequence[str] = ()) -> Dict[Path, str]:
    """final_evaluation of each run; a run it cannot evaluate (unfinished, no checkpoint, its
    evaluation images not found, a batch its images cannot fill) is named and skipped. Returns
    the skipped runs with why: their final_eval.json, if any, is not what was asked for."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the checkpoint loader imports DeepSpeed
    skipped = {}
    for run_dir in run_dirs:
        try:
            row = final_evaluation(run_dir, finetune_epochs, overrides=overrides)
            print(f"{run_dir}: " + ", ".join(f"{m} {row[m]:.2f}" for m in METRICS if m in row))
        except (RuntimeError, ValueError, OSError) as err:
            why = str(err) if isinstance(err, RuntimeError) else f"{run_dir}: {err}"
            if "eval.path" in why and not any(item.startswith("eval.path=") for item in overrides):
                why += " (for the final evaluation only: collect --set eval.path=DIR)"
            print(f"skipped: {why}", file=sys.stderr)
            skipped[Path(run_dir)] = why
    return skipped


def not_evaluated_at_budget(run_dirs) -> List[Path]:
    """The finished runs whose training did not evaluate their last epoch (the default
    eval.every_epochs does not divide every budget): the study evaluates them afterwards."""
    runs = [load_run(d) for d in run_dirs if (Path(d) / "config.yaml").is_file()]
    return [run.path for run in runs if run.finished and not evaluated_at_budget(run)]


def run_study(planned, stop_signals: ChildRunner) -> int:
    """Trains each planned run not yet finished, one after the other; stops at a signal."""
    for p in planned:
        if stop_signals.signum:
            break
        if says_finished(read_state(p.run_dir)):
            print(f"== {p.name}: finished (state.json), skipped", flush=True)
            continue
        # An unfinished run directory resumes from its newest checkpoint (checkpoint.resume=auto).
        print(f"== {p.name}: {shlex.join(p.argv)}", flush=True)
        code = stop_signals.run(p.argv)
        if stop_signals.signum:
            print(f"{p.name} exited with code {code} after the study got "
                  f"{signal.Signals(stop_signals.signum).name} (passed on: the trainer checkpoints first)",
                  file=sys.stderr)
            break
        if code != 0:
            print(f"{p.name} failed with exit code {code}", file=sys.stderr)
            return code
        state = read_state(p.run_dir) or {}
        if not says_finished(state):  # stopped by a signal sent to the trainer alone
            print(f"{p.name} exited without finishing (state.json: {state.get('reason', 'none')}); no further "
                  "run started. Run the same command again to resume it.", file=sys.stderr)
            return 1
    if stop_signals.signum:
        print(f"study stopped by {signal.Signals(stop_signals.signum).name}; no further run started. "
              "Run the same command again to resume it.", file=sys.stderr)
        return 128 + stop_signals.signum
    return 0
