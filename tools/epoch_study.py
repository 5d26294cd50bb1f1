#!/usr/bin/env python
"""Epoch-efficiency study, baseline vs MTO (definitions: docs/STUDY.md).

  run      pre-train baseline and MTO with the same seed, data and budget, then collect:
             tools/epoch_study.py run --config configs/demo.yaml --out runs/study \\
                 --epochs 20 --seeds 0 1 [--eval-every 2] [--launcher "torchrun --nproc_per_node 2"] \\
                 [section.key=value ...]
           Runs whose state.json says finished are skipped; an unfinished one resumes. A run
           directory set up with other settings than this command's is refused (use a new --out).
           SIGTERM, SIGUSR1 and SIGINT are passed on to the running trainer, which checkpoints;
           the study then stops (exit 128 + signal): run the same command again to resume.
           --list prints the numbered commands; --index I runs only command I (one per SLURM
           array element: --index $SLURM_ARRAY_TASK_ID), then `collect` the study directory.
  collect  read run directories (or directories of them, e.g. a slurm/sweep.sbatch study
           directory) and write curves.png, heterogeneity.png, summary.md, summary.json:
             tools/epoch_study.py collect runs/study --out runs/study/report [--metric linear_top1]
           --final-eval evaluates each finished run's last checkpoint first (needed where the
           runs did not evaluate at their last epoch, e.g. eval.every_epochs=0 as in
           configs/vit_*.yaml; with --finetune-epochs N also fine-tunes it: the paper's metric,
           --metric finetune_top1). --set eval.KEY=VALUE (repeatable) changes how every run is
           evaluated there, e.g. --set eval.path=/data/imagenet for runs pre-trained on FFCV.
Bad arguments end with a message naming the problem and exit code 2.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.config import ConfigError  # noqa: E402
from mto_ds.eval.study import METRICS, StudyError, assemble, find_run_dirs, load_runs  # noqa: E402
from mto_ds.eval.study_report import write_report  # noqa: E402
from mto_ds.eval.study_runs import (ChildRunner, check_eval_overrides, evaluate_last_checkpoints,  # noqa: E402
                                    not_evaluated_at_budget, plan_runs, resume_conflicts, run_study)


def collect(paths, out: Path, metric: str, mode: str, final_eval: bool, finetune_epochs: int,
            skipped: Optional[Dict[Path, str]] = None, eval_overrides: Sequence[str] = ()) -> int:
    """The report of the runs under `paths`. A run whose final evaluation was refused (`skipped`,
    with why) is read without its final_eval.json, which may be from before its last training."""
    run_dirs = find_run_dirs(paths)
    skipped = dict(skipped or {})
    if final_eval:
        check_eval_overrides(eval_overrides)
        skipped.update(evaluate_last_checkpoints(run_dirs, finetune_epochs, eval_overrides))
    study = assemble(load_runs(run_dirs, skipped), metric=metric, mode=mode)
    paths = write_report(study, out)
    print(paths["summary.md"].read_text())
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


class _Override(str):
    """A section.key=value that --epochs or --seeds took (nargs='+' takes every value after it)."""


def _number_or_override(text: str):
    if "=" in text and not text.startswith("-"):
        return _Override(text)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor a section.key=value "
                                         "override") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="launch baseline and MTO pre-training, then collect")
    run.add_argument("--config", required=True)
    run.add_argument("--out", required=True, type=Path, help="study directory: one run directory per run")
    run.add_argument("--epochs", required=True, type=_number_or_override, nargs="+",
                     help="budget(s); several budgets make a budget curve (one run per budget)")
    run.add_argument("--seeds", type=_number_or_override, nargs="+", default=[0])
    run.add_argument("--eval-every", type=int, default=None,
                     help="evaluate every E epochs, E dividing each budget (default: budget / 10 rounded, "
                          "at least 1; where that does not divide the budget, the last checkpoint is "
                          "evaluated after training)")
    run.add_argument("--launcher", default=None, help='replaces "python", e.g. "torchrun --nproc_per_node 2"')
    run.add_argument("--list", action="store_true", help="print the numbered commands and stop")
    run.add_argument("--index", type=int, default=None, help="run only command INDEX (a SLURM array element)")
    run.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    col = sub.add_parser("collect", help="report on existing run directories")
    col.add_argument("paths", nargs="+", type=Path, help="run directories or directories holding them")
    col.add_argument("--out", required=True, type=Path)
    col.add_argument("--final-eval", action="store_true", help="evaluate each finished run's last checkpoint first")
    col.add_argument("--finetune-epochs", type=int, default=0, help="with --final-eval: fine-tune N epochs too")
    col.add_argument("--set", dest="eval_overrides", action="append", default=None, metavar="eval.KEY=VALUE",
                     help="with --final-eval: evaluate every run with this eval.* (or data.num_workers) value "
                          "instead of its config.yaml's, e.g. eval.path=/data/imagenet; repeat for several")
    for p in (run, col):
        p.add_argument("--metric", choices=METRICS, default="knn_top1")
        p.add_argument("--curve", choices=("auto", "periodic", "budget"), default="auto",
                       help="auto: budget when a method and seed have several runs, else periodic")
    return parser


def _split_overrides(args, argv: List[str]) -> None:
    """Moves the overrides that --epochs / --seeds took into args.overrides, in command-line order."""
    taken = [v for v in [*args.epochs, *args.seeds] if isinstance(v, _Override)]
    args.epochs = [v for v in args.epochs if not isinstance(v, _Override)]
    args.seeds = [v for v in args.seeds if not isinstance(v, _Override)]
    args.overrides = sorted([*taken, *args.overrides], key=lambda item: argv.index(item) if item in argv else 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            if args.finetune_epochs and not args.final_eval:
                raise StudyError("--finetune-epochs fine-tunes in the final evaluation: add --final-eval")
            if args.finetune_epochs < 0:
                raise StudyError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
            if args.eval_overrides and not args.final_eval:
                raise StudyError("--set changes how the final evaluation evaluates the runs: add --final-eval")
            return collect(args.paths, args.out, args.metric, args.curve, args.final_eval, args.finetune_epochs,
                           eval_overrides=args.eval_overrides or [])
        return _run(args, argv)
    except (StudyError, ConfigError) as err:
        print(f"epoch_study.py {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args, argv: List[str]) -> int:
    _split_overrides(args, argv)
    planned = plan_runs(args.config, args.out, epochs=args.epochs, seeds=args.seeds, eval_every=args.eval_every,
                        overrides=args.overrides, launcher=args.launcher, curve=args.curve)
    if args.list:
        for i, p in enumerate(planned):
            print(f"{i} {shlex.join(p.argv)}")
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(planned):
            raise StudyError(f"--index {args.index} out of range 0..{len(planned) - 1}")
        planned = [planned[args.index]]
    if planned and shutil.which(planned[0].argv[0]) is None:
        raise StudyError(f"--launcher: {planned[0].argv[0]!r} not found on PATH (give its path, or activate "
                         "the environment that has it)")
    # Before anything starts: a resumed run must go on with its own settings, and a finished
    # one's numbers must be of this command's settings, or the report would mix two studies.
    conflicts = {p.name: resume_conflicts(p) for p in planned}
    conflicts = {name: diffs for name, diffs in conflicts.items() if diffs}
    if conflicts:
        raise StudyError(f"{args.out} already holds runs set up differently from this command (existing vs now):\n"
                         + "\n".join(f"  {name}: {'; '.join(diffs)}" for name, diffs in conflicts.items())
                         + "\nuse a new --out study directory, or the settings those runs were started with")
    with ChildRunner() as stop_signals:
        code = run_study(planned, stop_signals)
    if code != 0:
        return code
    missing = not_evaluated_at_budget([p.run_dir for p in planned])
    skipped = evaluate_last_checkpoints(missing, 0) if missing else {}
    if args.index is not None:
        return 0  # other elements may still be running: collect once all have finished
    # The report is of this command's runs: others under --out (an earlier command's budgets)
    # would turn a periodic study into a budget curve unseen.
    ours = {p.run_dir.resolve() for p in planned}
    others = [d for d in find_run_dirs([args.out]) if d.resolve() not in ours]
    if others:
        print(f"left out of this report, not runs of this command: {', '.join(map(str, others))} "
              f"(`tools/epoch_study.py collect {args.out} --out DIR` reports on every run there)", file=sys.stderr)
    return collect([p.run_dir for p in planned], args.out / "report", args.metric, args.curve, False, 0, skipped)


if __name__ == "__main__":
    sys.exit(main())
