"""Evaluation of frozen and fine-tuned encoders, and the epoch-efficiency study's curves.

Trainer hook: `evaluate(encoder, cfg, device)`; `mto-ds eval`: `run_eval(cfg, checkpoint,
finetune_epochs)`; study: `mto_ds.eval.study` (reading and assembling runs),
`mto_ds.eval.study_report` (the report) and `mto_ds.eval.study_runs` (launching them), driven by
tools/epoch_study.py.
"""
from .datasets import build_eval_sets
from .features import extract_features, feature_fn, pool_tokens
from .finetune import finetune_top1
from .knn import knn_predict, knn_top1
from .linear_probe import linear_probe_top1
from .rauc import area_under, compare_curves, epochs_to_reach, rauc
from .run import evaluate, load_encoder_weights, run_eval

__all__ = ["build_eval_sets", "extract_features", "feature_fn", "pool_tokens", "finetune_top1",
           "knn_predict", "knn_top1", "linear_probe_top1", "area_under", "compare_curves",
           "epochs_to_reach", "rauc", "evaluate", "load_encoder_weights", "run_eval"]
