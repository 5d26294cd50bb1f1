#!/usr/bin/env python
"""Epoch-efficiency study, baseline vs MTO (definitions: docs/STUDY.md).

  run      pre-train baseline and MTO with the same seed, data and budget, then collect:
             tools/epoch_study.py run --config configs/demo.yaml --out runs/study \\
                 --epochs 20 --seeds 0 1 [--eval-every 2] [--launcher "torchrun --nproc_per_node 2"] \\
                 [section.key=value ...]
           --list prints the numbered commands; --index I runs only command I (one per SLURM
           array element: --index $SLURM_ARRAY_TASK_ID), then `collect` the study directory.
  collect  read run directories (or directories of them, e.g. a slurm/sweep.sbatch study
           directory) and write curves.png, heterogeneity.png, summary.md, summary.json:
             tools/epoch_study.py collect runs/study --out runs/study/report [--metric linear_top1]
           --final-eval evaluates each finished run's last checkpoint first (with
           --finetune-epochs N also fine-tunes it: the paper's metric, --metric finetune_top1).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mto_ds.eval.study import (METRICS, assemble, final_evaluation, find_run_dirs, load_run, plan_runs,
                               write_report)


def collect(paths, out: Path, metric: str, mode: str, final_eval: bool, finetune_epochs: int) -> int:
    run_dirs = find_run_dirs(paths)
    if final_eval:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the checkpoint loader imports DeepSpeed
        for run_dir in run_dirs:
            try:
                row = final_evaluation(run_dir, finetune_epochs)
                print(f"{run_dir}: " + ", ".join(f"{m} {row[m]:.2f}" for m in METRICS if m in row))
            except RuntimeError as err:
                print(f"skipped: {err}", file=sys.stderr)
    study = assemble([load_run(d) for d in run_dirs], metric=metric, mode=mode)
    paths = write_report(study, out)
    print(paths["summary.md"].read_text())
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="launch baseline and MTO pre-training, then collect")
    run.add_argument("--config", required=True)
    run.add_argument("--out", required=True, type=Path, help="study directory: one run directory per run")
    run.add_argument("--epochs", required=True, type=int, nargs="+",
                     help="budget(s); several budgets make a budget curve (one run per budget)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--eval-every", type=int, default=None,
                     help="evaluate every E epochs (default: about ten times per run, dividing its budget)")
    run.add_argument("--launcher", default=None, help='replaces "python", e.g. "torchrun --nproc_per_node 2"')
    run.add_argument("--list", action="store_true", help="print the numbered commands and stop")
    run.add_argument("--index", type=int, default=None, help="run only command INDEX (a SLURM array element)")
    run.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    col = sub.add_parser("collect", help="report on existing run directories")
    col.add_argument("paths", nargs="+", type=Path, help="run directories or directories holding them")
    col.add_argument("--out", required=True, type=Path)
    col.add_argument("--final-eval", action="store_true", help="evaluate each finished run's last checkpoint first")
    col.add_argument("--finetune-epochs", type=int, default=0)
    for p in (run, col):
        p.add_argument("--metric", choices=METRICS, default="knn_top1")
        p.add_argument("--curve", choices=("auto", "periodic", "budget"), default="auto",
                       help="auto: budget when a method and seed have several runs, else periodic")
    args = parser.parse_args(argv)

    if args.command == "collect":
        return collect(args.paths, args.out, args.metric, args.curve, args.final_eval, args.finetune_epochs)

    planned = plan_runs(args.config, args.out, epochs=args.epochs, seeds=args.seeds, eval_every=args.eval_every,
                        overrides=args.overrides, launcher=args.launcher)
    if args.list:
        for i, p in enumerate(planned):
            print(f"{i} {shlex.join(p.argv)}")
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(planned):
            print(f"--index {args.index} out of range 0..{len(planned) - 1}", file=sys.stderr)
            return 2
        planned = [planned[args.index]]
    for p in planned:
        # A run directory that exists resumes from its newest checkpoint (checkpoint.resume=auto).
        print(f"== {p.name}: {shlex.join(p.argv)}", flush=True)
        result = subprocess.run(p.argv)
        if result.returncode != 0:
            print(f"{p.name} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
    if args.index is not None:
        return 0  # other elements may still be running: collect once all have finished
    return collect([args.out], args.out / "report", args.metric, args.curve, False, 0)


if __name__ == "__main__":
    sys.exit(main())
