"""Evaluation of frozen and fine-tuned encoders, and the epoch-efficiency study's curves.

Trainer hook: `evaluate(encoder, cfg, device)`; `mto-ds eval`: `run_eval(cfg, checkpoint,
finetune_epochs)`; `mto-ds reconstruct`: `mto_ds.eval.reconstruct.reconstruct_run`; study:
`mto_ds.eval.study` (reading and assembling runs), `mto_ds.eval.study_report` (the report) and
`mto_ds.eval.study_runs` (launching them), driven by tools/epoch_study.py.

The names below are imported on first use: the study's modules need no torch, so
`tools/epoch_study.py collect` (and every `--help`) starts without loading it.
"""
from importlib import import_module

# numpy only; imported here so that `mto_ds.eval.rauc` is the function, not its module
from .rauc import area_under, compare_curves, epochs_to_reach, rauc

_WHERE = {
    "build_eval_sets": "datasets",
    "extract_features": "features", "feature_fn": "features", "pool_tokens": "features",
    "finetune_top1": "finetune",
    "knn_predict": "knn", "knn_top1": "knn",
    "linear_probe_top1": "linear_probe",
    "evaluate": "run", "load_encoder_weights": "run", "run_eval": "run",
}

__all__ = ["area_under", "compare_curves", "epochs_to_reach", "rauc", *_WHERE]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
