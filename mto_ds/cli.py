"""`mto-ds` console script: pretrain, eval, export, reconstruct."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional


def _setup_environment() -> None:
    # DeepSpeed picks its accelerator at import; on a machine without CUDA say CPU explicitly,
    # else it fails looking for one.
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _recorded(fn):
    """`fn` under torchrun's `record`: a rank's uncaught exception goes to the error file torchrun
    gives each rank, so its closing summary shows each failed rank's traceback, not only exit
    codes (faulthandler on, too). Without torchrun it only runs `fn`."""
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(fn)


def _error(line: str) -> None:
    """A line on stderr in one write: print's two (the text, then the newline) let the ranks of a
    job that fail together interleave their lines on the launcher's shared stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def unwritable_output(out) -> Optional[str]:
    """Why no file can be written at `out` (its missing folders made on the way), or None: asked
    before the work whose result it receives (export, tools/make_ffcv.py), not after it."""
    from .config import unwritable_folder
    out = Path(out)
    if out.is_dir():
        return f"cannot write {out}: it is a directory (name the file to write)"
    problem = unwritable_folder(out.parent)
    return f"cannot write {out}: {problem}" if problem else None


def unwritable_folder_output(out) -> Optional[str]:
    """Why `out` cannot become a folder of exported files: a file there, a folder that holds files
    already (never mixed with another export's), or one that cannot be made or written."""
    from .config import unwritable_folder
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"cannot write the folder {out}: a file is there"
    if out.is_dir() and any(out.iterdir()):
        return f"cannot write the folder {out}: it holds files already (name a new or empty folder)"
    problem = unwritable_folder(out)
    return f"cannot write the folder {out}: {problem}" if problem else None


class _Once(argparse.Action):
    """An option that may be given once: argparse keeps the last of two, silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): give one"
                         + (" (a YAML file combines others with _base_: [a.yaml, b.yaml])"
                            if option_string == "--config" else ""))
        setattr(namespace, self.dest, values)


class _Version(argparse.Action):
    """--version: the package's version and the git commit of the checkout it runs from, without
    importing torch (the commit is asked of git only when the option is given)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and git commit, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .engine.provenance import code_version, describe_code
        print(f"mto-ds {describe_code(code_version())}")
        parser.exit()


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: expected an integer >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


PRINT_CONFIG_HELP = ("print the config resolved (the schema's defaults <- the file and its _base_ files <- the "
                     "overrides) and checked, as YAML, every key included, and exit: nothing is started")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mto-ds", description="MIM pre-training with Masked Token Optimization")
    # DeepSpeed's launcher runs `python -m mto_ds --local_rank=N <command> ...` (the rank is also in
    # LOCAL_RANK, which is what is read): accepted before the command as well as after it.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pre-train a ViT with SimMIM/MAE (+MTO) under DeepSpeed")
    pre.add_argument("--config", required=True, action=_Once, help="run YAML (configs/*.yaml)")
    pre.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    pre.add_argument("--dry-run", action="store_true",
                     help="check what a start would do (config, batch split, DeepSpeed file, data, resume) and "
                          "print it, starting nothing: before a job is queued")
    pre.add_argument("--world-size", type=_positive, default=None, metavar="N",
                     help="with --dry-run: the number of ranks to plan for (default 1)")
    pre.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    pre.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ev = sub.add_parser("eval", help="k-NN / linear probe / fine-tune of a checkpoint's encoder")
    ev.add_argument("--config", required=True, action=_Once, help="the run YAML the encoder was pre-trained with")
    ev.add_argument("--checkpoint", required=True, action=_Once,
                    help="run directory, checkpoint directory, timm model folder or weights file "
                         "(.pt, .pth, .safetensors)")
    ev.add_argument("--finetune-epochs", type=_count, default=0,
                    help="also fine-tune end to end for this many epochs (default 0: k-NN and linear probe only)")
    ev.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    ev.add_argument("overrides", nargs="*", help="section.key=value overrides (eval.*, data.*)")
    ex = sub.add_parser("export", help="write the encoder as a timm state dict")
    ex.add_argument("run_dir", help="run directory (its newest complete checkpoint) or a checkpoint directory")
    ex.add_argument("out", help="the file to write: a timm state dict of the encoder (.safetensors: in that "
                    "format, else torch.save's); with --folder, the folder")
    ex.add_argument("--folder", action="store_true",
                    help="write OUT as a timm model folder (config.json, model.safetensors) that "
                         "timm.create_model('local-dir:OUT') loads with the run's image size, preprocessing and mean "
                         "pooling, and that the Hugging Face Hub takes as a model repository")
    rc = sub.add_parser("reconstruct", help="a PNG of images, their masks and a checkpoint's reconstructions",
                        description="One row per image: the image | the masked input | the prediction of every "
                                    "patch | the prediction in the masked patches, the visible ones pasted back; "
                                    "prints each image's loss_mim. The run's config.yaml gives the model and the "
                                    "mask generator.")
    rc.add_argument("run_dir", help="run directory (its newest complete checkpoint) or a checkpoint directory")
    rc.add_argument("out", help="the image to write (.png or .jpg)")
    rc.add_argument("images", nargs="*",
                    help="image files or folders (their image files, sorted); default: the run's evaluation val "
                         "split (synthetic runs: held-out synthetic images)")
    rc.add_argument("--count", type=_positive, default=8, help="at most this many images (default 8)")
    rc.add_argument("--seed", type=_count, default=0,
                    help="the masks' seed (default 0): the same images and seed give the same masks at every "
                         "checkpoint")
    st = sub.add_parser("status", help="where runs stand: state, step, speed, time to go, checkpoints",
                        description="Read from the run directories' files alone (torch is not imported, "
                                    "nothing is written); a running.json is watched for up to 10 s to tell a "
                                    "live start from a dead one.")
    st.add_argument("run_dirs", nargs="+", metavar="RUN",
                    help="run directories, or directories holding them (a sweep, a study, runs/)")
    st.add_argument("--json", action="store_true", help="one JSON object per run, for scripts")
    return p


def _parse(argv) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a positional list only one run of words: overrides on both sides of --config
    # (`pretrain train.steps=9 --config c.yaml run.output_dir=r`) leave the second run unparsed.
    if extra and hasattr(args, "overrides") and not any(word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _print_config(args) -> int:
    """The config a start (or an evaluation) would run with, as YAML: `--config` of the output runs the same."""
    from .config import ConfigError, load_config, to_yaml
    try:
        cfg = load_config(args.config, args.overrides, training=args.command == "pretrain")
    except ConfigError as err:
        _error(f"mto-ds: config error: {err}")
        return 2
    print(to_yaml(cfg), end="")
    return 0


def _dry_run(args) -> int:
    from .config import ConfigError, load_config
    world_size = args.world_size or 1
    try:
        cfg = load_config(args.config, args.overrides, training=True)
        _setup_environment()
        from .engine.dry_run import dry_run
        lines = dry_run(cfg, world_size)
    except ConfigError as err:
        _error(f"mto-ds: config error: {err}")
        return 2
    print(f"mto-ds pretrain --dry-run: {args.config} on {world_size} rank{'s' if world_size > 1 else ''}; "
          "nothing was started")
    for line in lines:
        print(f"  {line}")
    return 0


def _reconstruct_problem(args) -> Optional[str]:
    """What is wrong with reconstruct's paths, or None: asked before torch's seconds of imports."""
    from .config import run_config_file
    missing = [path for path in (args.run_dir, *args.images) if not Path(path).exists()]
    if missing:
        return f"{missing[0]} does not exist"
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg") and not Path(args.out).is_dir():
        return f"{args.out}: name a .png or .jpg to write"
    if run_config_file(args.run_dir) is None:
        return (f"no config.yaml in {args.run_dir} or the two folders above it: reconstruct reads the run's "
                "config (model, masks) from its run directory")
    return unwritable_output(args.out)


def _reconstruct(args) -> int:
    from .config import ConfigError
    problem = _reconstruct_problem(args)
    if problem:
        _error(f"mto-ds: {problem}")
        return 2
    _setup_environment()
    from .eval.reconstruct import reconstruct_run
    try:
        lines = reconstruct_run(Path(args.run_dir), Path(args.out), [Path(p) for p in args.images], args.count,
                                args.seed)
    except (FileNotFoundError, ValueError) as err:  # no checkpoint or image, a config that no longer loads
        _error(f"mto-ds: {'config error: ' if isinstance(err, ConfigError) else ''}{err}")
        return 2
    print("\n".join(lines))
    return 0


def _status(args) -> int:
    from .engine.status import runs_at, status_report
    from .eval.study import StudyError
    try:
        runs = runs_at(args.run_dirs)
    except StudyError as err:
        _error(f"mto-ds: {err}")
        return 2
    print(status_report(runs, as_json=args.json))
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`mto-ds status runs/ | head`): end quietly, as a process killed by
        # SIGPIPE would, and keep the interpreter's final flush from raising it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv=None) -> int:
    args = _parse(argv)
    stop = None
    if args.command == "pretrain" and args.world_size is not None and not args.dry_run:
        _error("mto-ds: --world-size goes with --dry-run: a start takes its ranks from its launcher")
        return 2
    if getattr(args, "print_config", False):
        if getattr(args, "dry_run", False):
            _error("mto-ds: --print-config and --dry-run: give one")
            return 2
        return _print_config(args)
    if args.command == "pretrain" and args.dry_run:
        return _dry_run(args)
    if args.command == "pretrain":
        # First, before the imports that take seconds: a scheduler's SIGTERM/SIGUSR1 in that
        # window would otherwise kill the rank (default action) or be lost.
        from .engine.signals import StopRequest
        stop = StopRequest()
    from .config import ConfigError, load_config

    if args.command == "export":
        # Before torch's seconds of imports, as is the output's check: a mistyped path is named at once.
        problem = (unwritable_folder_output(args.out) if args.folder else unwritable_output(args.out)) or (
            None if Path(args.run_dir).exists() else
            f"{args.run_dir} does not exist (export reads a run directory or a checkpoint directory)")
        if problem:
            _error(f"mto-ds: {problem}")
            return 2
        _setup_environment()
        from .engine.export import export_encoder, export_timm_folder
        try:
            print((export_timm_folder if args.folder else export_encoder)(args.run_dir, args.out))
        except (FileNotFoundError, ValueError) as err:  # a path given on the command line: its message names it
            _error(f"mto-ds: {err}")
            return 2
        return 0
    if args.command == "reconstruct":
        return _reconstruct(args)
    if args.command == "status":
        return _status(args)
    try:
        cfg = load_config(args.config, args.overrides, training=args.command == "pretrain")
    except ConfigError as err:
        _error(f"mto-ds: config error: {err}")
        return 2
    if args.command == "eval" and not Path(args.checkpoint).exists():  # at once, not after the imports
        _error(f"mto-ds: checkpoint not found: {args.checkpoint}")
        return 2
    _setup_environment()
    if args.command == "pretrain":
        from .engine.distributed import shutdown_distributed
        from .engine.step import NonFiniteLossError
        from .engine.trainer import Trainer
        try:
            _recorded(lambda: Trainer(cfg, stop).train())()
            code = 0
        except ConfigError as err:
            _error(f"mto-ds: config error: {err}")
            code = 2
        except NonFiniteLossError as err:
            _error(f"mto-ds: {err}")
            code = 1
        # Also after these errors, which every rank raises together: a process group left to the
        # interpreter's exit can abort the rank, and exit 134 would hide a config error's 2.
        stop.ignore_from_now()  # nor may a TERM meant for a rank still exiting (signals.py)
        shutdown_distributed()
        return code
    import json

    from .engine.distributed import init_distributed, shutdown_distributed
    from .eval.run import run_eval
    init_distributed()  # eval shards its feature extraction across ranks when launched on several
    try:
        result = _recorded(run_eval)(cfg, args.checkpoint, args.finetune_epochs)
    except (FileNotFoundError, ValueError) as err:
        # --checkpoint or the evaluation folders missing, weights of another model than the
        # config's, settings that cannot be evaluated: each message names its cause.
        _error(f"mto-ds: {'config error: ' if isinstance(err, ConfigError) else ''}{err}")
        shutdown_distributed()
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        # Which weights (a checkpoint's tag and step, or a file's size and time): a loop over a
        # run's kept checkpoints gives a curve.
        from .models.weights import weights_identity
        print(json.dumps({**result, "weights": weights_identity(args.checkpoint)}))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
