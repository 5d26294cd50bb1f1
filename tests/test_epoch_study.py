import importlib.util
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from mto_ds.config import Config, load_config, to_yaml
from mto_ds.eval import study as study_module
from mto_ds.eval import study_report
from mto_ds.eval.plots import bin_rows
from mto_ds.eval.study import StudyError, assemble, find_run_dirs, load_run
from mto_ds.eval.study_runs import default_eval_every, final_evaluation, plan_runs

TOOL = Path(__file__).resolve().parents[1] / "tools" / "epoch_study.py"
BASELINE_KNN = {1: 20.0, 2: 40.0, 3: 50.0, 4: 60.0}
MTO_KNN = {1: 40.0, 2: 60.0, 3: 65.0, 4: 70.0}
# Known answers: the baseline ends at 60 (epoch 4); MTO reaches 60 at epoch 2 (50% fewer epochs).
# Areas over [1, 4]: baseline 30 + 45 + 55 = 130, MTO 50 + 62.5 + 67.5 = 180.
KNOWN_RAUC = 180 / 130


def _tool():
    spec = importlib.util.spec_from_file_location("epoch_study_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(run_dir: Path, *, mto: bool, seed: int = 0, knn=None, epochs: int = 4, steps_per_epoch: int = 5,
             blocks: int = 4, blr: float = 1e-3, extra_rows=(), finished: bool = True, budget: int = None):
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl, state.json.
    `epochs` is what it trained, `budget` (default: `epochs`) its train.epochs; finished=None
    leaves state.json out, as a hard kill does."""
    cfg = Config()
    cfg.run.output_dir, cfg.run.seed = str(run_dir), seed
    cfg.mto.enabled, cfg.train.epochs, cfg.train.blr = mto, budget or epochs, blr
    cfg.deepspeed.config = "ds_configs/cpu_zero2.json"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    rows = []
    for step in range(1, epochs * steps_per_epoch + 1):
        progress = step / (epochs * steps_per_epoch)
        het = [(0.9 if mto else 0.3) * progress * (blocks - b) / blocks for b in range(blocks)]
        rows.append({"step": step, "epoch": step / steps_per_epoch, "loss": 1.0 - 0.5 * progress,
                     "heterogeneity": het})
        if step % steps_per_epoch == 0 and knn and step // steps_per_epoch in knn:
            epoch = step // steps_per_epoch
            rows.append({"step": step, "epoch": float(epoch), "knn_top1": knn[epoch],
                         "linear_top1": knn[epoch] + 5})
    rows.extend(extra_rows)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished is not None:
        reason = "completed" if finished else "signal SIGTERM"
        (run_dir / "state.json").write_text(json.dumps({"finished": finished, "step": epochs * steps_per_epoch,
                                                        "reason": reason}))
    return run_dir


def _readable_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
    assert pixels.std() > 0.05  # not a blank canvas
    return pixels


def test_collect_writes_both_plots_and_a_summary_with_the_known_numbers(tmp_path):
    fake_run(tmp_path / "study" / "baseline-ep4-s0", mto=False, knn=BASELINE_KNN)
    fake_run(tmp_path / "study" / "mto-ep4-s0", mto=True, knn=MTO_KNN)
    out = tmp_path / "report"
    assert _tool().main(["collect", str(tmp_path / "study"), "--out", str(out)]) == 0
    _readable_png(out / "curves.png")
    _readable_png(out / "heterogeneity.png")
    summary = json.loads((out / "summary.json").read_text())
    numbers = summary["numbers"]["seed 0"]
    assert summary["mode"] == "periodic"
    assert numbers["rauc"] == pytest.approx(KNOWN_RAUC)
    assert numbers["mto_epochs_to_baseline"] == pytest.approx(2.0)
    assert numbers["epoch_saving"] == pytest.approx(0.5)
    assert summary["numbers"]["mean"] == numbers
    text = (out / "summary.md").read_text()
    assert f"{KNOWN_RAUC:.4f}" in text and "50.0 %" in text and "![" in text
    assert "Warnings" not in text


def test_collect_from_the_command_line_never_imports_torch(tmp_path):
    """Collecting reads JSON and draws plots: on a login node it must not spend seconds (and a
    CUDA context's worth of libraries) loading torch. `-X importtime` lists every module imported."""
    fake_run(tmp_path / "study" / "baseline-ep4-s0", mto=False, knn=BASELINE_KNN)
    fake_run(tmp_path / "study" / "mto-ep4-s0", mto=True, knn=MTO_KNN)
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-X", "importtime", str(TOOL), "collect", str(tmp_path / "study"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "mto_ds.eval.study_report" in imported and (out / "summary.json").is_file()
    assert not {name for name in imported if name.split(".")[0] in ("torch", "deepspeed", "timm")}


def test_runs_are_labelled_from_their_config_not_their_directory_name(tmp_path):
    fake_run(tmp_path / "job_7", mto=True, knn=MTO_KNN)
    fake_run(tmp_path / "job_8", mto=False, knn=BASELINE_KNN)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.curves[0]["mto"] == ([1.0, 2.0, 3.0, 4.0], [40.0, 60.0, 65.0, 70.0])
    assert study.numbers["seed 0"]["rauc"] == pytest.approx(KNOWN_RAUC)


def test_a_sweep_of_budgets_gives_a_budget_curve_of_final_accuracies(tmp_path):
    # slurm/sweep.sbatch layout: one run per (method, budget); each contributes its final accuracy.
    for budget in (2, 4):
        fake_run(tmp_path / f"baseline-ep{budget}-s0", mto=False, epochs=budget,
                 knn={budget: BASELINE_KNN[budget]})
        fake_run(tmp_path / f"mto-ep{budget}-s0", mto=True, epochs=budget, knn={budget: MTO_KNN[budget]})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.mode == "budget"
    assert study.curves[0]["baseline"] == ([2.0, 4.0], [40.0, 60.0])
    assert study.numbers["seed 0"]["mto_epochs_to_baseline"] == pytest.approx(2.0)
    assert study.numbers["seed 0"]["rauc"] == pytest.approx((60 + 70) / (40 + 60))


def test_a_budget_curve_starts_at_the_initial_encoders_evaluation_when_a_run_logged_it(tmp_path):
    """eval.at_start logs the initial encoder at epoch 0 in every run of a seed; the budget curve
    takes it as its budget-0 point, so MTO's crossing of the baseline's final accuracy inside the
    first budget is interpolated from there rather than an upper bound at that budget."""
    at_start = [{"step": 0, "epoch": 0.0, "knn_top1": 10.0, "linear_top1": 12.0}]
    for budget in (2, 4):
        fake_run(tmp_path / f"baseline-ep{budget}-s0", mto=False, epochs=budget, knn={budget: BASELINE_KNN[budget]},
                 extra_rows=at_start)
        # MTO's 2-epoch run was killed: no budget point, but its epoch-0 evaluation stands.
        fake_run(tmp_path / f"mto-ep{budget}-s0", mto=True, epochs=budget, knn={budget: 65.0 + budget},
                 extra_rows=at_start, finished=budget == 4)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.curves[0]["baseline"] == ([0.0, 2.0, 4.0], [10.0, 40.0, 60.0])
    assert study.curves[0]["mto"] == ([0.0, 4.0], [10.0, 69.0])
    # MTO reaches the baseline's final 60 at 4 * 50 / 59 epochs, on the line from (0, 10) to (4, 69).
    assert study.numbers["seed 0"]["mto_epochs_to_baseline"] == pytest.approx(4 * 50 / 59)
    assert not study.numbers["seed 0"]["mto_epochs_to_baseline_is_bound"]


def test_a_curve_that_ends_no_higher_than_its_initial_encoder_is_named(tmp_path):
    """The demo set: a random encoder scores 99.8 % k-NN at epoch 0 and pre-training lowers it."""
    at_start = [{"step": 0, "epoch": 0.0, "knn_top1": 99.8}]
    fake_run(tmp_path / "b", mto=False, knn={1: 99.2, 2: 99.0}, epochs=2, extra_rows=at_start)
    fake_run(tmp_path / "m", mto=True, knn={1: 99.4, 2: 99.9}, epochs=2, extra_rows=at_start)
    notes = [w for w in assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")]).warnings
             if "has not improved" in w]
    assert notes == ["seed 0 baseline: knn_top1 99 at epoch 2 is no higher than the initial encoder's 99.8 "
                     "(epoch 0): pre-training has not improved on a random encoder by this metric"]


def test_seeds_are_paired_and_averaged(tmp_path):
    for seed, shift in ((0, 0.0), (1, 10.0)):
        fake_run(tmp_path / f"b{seed}", mto=False, seed=seed, knn={e: v + shift for e, v in BASELINE_KNN.items()})
        fake_run(tmp_path / f"m{seed}", mto=True, seed=seed, knn={e: v + shift for e, v in MTO_KNN.items()})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert set(study.numbers) == {"seed 0", "seed 1", "mean", "std over seeds"}
    assert study.mean_curves["baseline"][1] == [25.0, 45.0, 55.0, 65.0]
    assert study.numbers["mean"]["baseline_final_top1"] == 65.0
    spread = study.numbers["std over seeds"]  # finals 60 and 70: sample std 10 / sqrt(2)
    assert spread["baseline_final_top1"] == pytest.approx(10 / 2 ** 0.5)
    assert spread["rauc"] == pytest.approx(abs(study.numbers["seed 0"]["rauc"] - study.numbers["seed 1"]["rauc"])
                                           / 2 ** 0.5)


def test_the_spread_over_seeds_states_how_many_seeds_each_number_is_over(tmp_path):
    # Seed 2's MTO never reaches its baseline's final accuracy: its epochs-to-baseline and saving are
    # missing, so their spread is over 2 of the 3 seeds, which the report must say, not hide.
    for seed, mto_knn in ((0, MTO_KNN), (1, MTO_KNN), (2, {e: v - 30 for e, v in MTO_KNN.items()})):
        fake_run(tmp_path / f"b{seed}", mto=False, seed=seed, knn=BASELINE_KNN)
        fake_run(tmp_path / f"m{seed}", mto=True, seed=seed, knn=mto_knn)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.seeds == [0, 1, 2]
    assert study.std_counts["rauc"] == 3 and study.std_counts["epoch_saving"] == 2
    text = study_report.summary_markdown(study, "c.png", "h.png")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| mean of 3 seeds" in rows and "| std over 3 seeds" in rows
    assert " 0.00 (2 of 3) " in rows["| std over 3 seeds"]  # epochs to baseline: 2 and 2
    assert "never (to epoch 4)" in rows["| seed 2"]
    paths = study_report.write_report(study, tmp_path / "report")
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["std_counts"]["epoch_saving"] == 2


def test_the_figure_counts_only_the_seeds_its_mean_curve_averages(tmp_path, monkeypatch):
    from mto_ds.eval import plots
    for seed in (0, 1):
        fake_run(tmp_path / f"b{seed}", mto=False, seed=seed, knn=BASELINE_KNN)
        fake_run(tmp_path / f"m{seed}", mto=True, seed=seed, knn=MTO_KNN)
    fake_run(tmp_path / "b2", mto=False, seed=2, knn=BASELINE_KNN)  # no MTO partner: not in the mean
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_curves(tmp_path / "curves.png", study)
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    assert "baseline (mean of 2 seeds)" in labels and "MTO (mean of 2 seeds)" in labels


def test_budget_points_come_only_from_finished_runs_evaluated_at_their_budget(tmp_path):
    for budget in (2, 4):
        fake_run(tmp_path / f"mto-ep{budget}", mto=True, epochs=budget, knn={budget: MTO_KNN[budget]})
    # Killed part-way through a 4-epoch schedule: its epoch-2 accuracy is not a 2-epoch budget's.
    fake_run(tmp_path / "baseline-ep4", mto=False, epochs=4, knn={2: 40.0}, finished=False)
    fake_run(tmp_path / "baseline-ep2", mto=False, epochs=2, knn={1: 20.0})  # no evaluation at its end
    fake_run(tmp_path / "baseline-ep3", mto=False, epochs=3, knn={3: 50.0})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])], mode="budget")
    assert study.curves[0]["baseline"] == ([3.0], [50.0])
    assert any("baseline-ep4: unfinished" in w and "left out" in w for w in study.warnings)
    assert any("baseline-ep2: last knn_top1 evaluation at epoch 1" in w and "left out" in w for w in study.warnings)


def test_mean_curve_names_the_epochs_that_not_every_seed_evaluated(tmp_path):
    for seed in (0, 1):
        knn = BASELINE_KNN if seed == 0 else {e: v for e, v in BASELINE_KNN.items() if e != 3}
        fake_run(tmp_path / f"b{seed}", mto=False, seed=seed, knn=knn)
        fake_run(tmp_path / f"m{seed}", mto=True, seed=seed, knn=MTO_KNN)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.seeds == [0, 1] and study.mean_curves["baseline"][0] == [1.0, 2.0, 4.0]
    assert "baseline mean curve: epochs 3 left out (not evaluated for every one of the seeds 0, 1)" in study.warnings


def test_a_pair_that_differs_beyond_mto_is_reported(tmp_path):
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN, blr=1e-3)
    fake_run(tmp_path / "m", mto=True, knn=MTO_KNN, blr=2e-3)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    assert any("train.blr" in w for w in study.warnings)


def test_a_pair_that_differs_only_in_memory_and_speed_switches_is_comparable_where_init_from_is_not(tmp_path):
    """MTO may need activation checkpointing where the baseline does not: the gradients are the
    same, so no warning. The weights a run began from (model.init_from) are not incidental."""
    import yaml
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN)
    fake_run(tmp_path / "m", mto=True, knn=MTO_KNN)
    config = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    config["train"].update(activation_checkpointing=True, checkpoint_every=2, compile=True)
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(config))
    assert assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")]).warnings == []
    config["model"]["init_from"] = "runs/other"
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(config))
    warnings = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")]).warnings
    assert warnings == ["seed 0: baseline and MTO differ beyond MTO: model.init_from: None vs 'runs/other'"]


def test_metric_choice_and_eval_prefixed_keys_and_repeated_epochs(tmp_path):
    # A resumed run logs epoch 4 again (the later row replaces the earlier whole); some writers
    # prefix keys with 'eval/'.
    extra = [{"step": 20, "epoch": 4.0, "eval/linear_top1": 99.0}]
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN, extra_rows=extra)
    run = load_run(tmp_path / "b")
    assert run.curve("linear_top1") == ([1.0, 2.0, 3.0, 4.0], [25.0, 45.0, 55.0, 99.0])
    assert run.curve("knn_top1") == ([1.0, 2.0, 3.0], [20.0, 40.0, 50.0])


def test_heterogeneity_matrix_has_a_row_per_logged_step_and_nan_for_missing_blocks(tmp_path):
    extra = [{"step": 21, "epoch": 4.2, "loss": 0.4, "heterogeneity": [0.5, None, 0.1, 0.0]}]
    run = load_run(fake_run(tmp_path / "m", mto=True, knn=MTO_KNN, extra_rows=extra))
    assert run.heterogeneity.shape == (21, 4)
    assert np.isnan(run.heterogeneity[-1, 1]) and run.heterogeneity[-1, 0] == 0.5
    assert run.het_epochs[-1] == pytest.approx(4.2)


def test_bin_rows_averages_consecutive_rows_ignoring_nan():
    epochs = np.arange(6.0)
    matrix = np.array([[1.0], [3.0], [np.nan], [5.0], [7.0], [9.0]])
    binned_epochs, binned = bin_rows(epochs, matrix, 3)
    assert binned_epochs.tolist() == [0.5, 2.5, 4.5]
    assert binned[:, 0].tolist() == [2.0, 5.0, 8.0]


def test_plan_runs_builds_baseline_and_mto_commands_with_the_same_seed_data_and_budget():
    planned = plan_runs("configs/demo.yaml", Path("study"), epochs=[20], seeds=[0, 1], eval_every=5,
                        overrides=["data.synthetic_images=512"], launcher="torchrun --nproc_per_node 2")
    assert [p.name for p in planned] == ["baseline-ep20-s0", "mto-ep20-s0", "baseline-ep20-s1", "mto-ep20-s1"]
    assert shlex.join(planned[1].argv) == (
        "torchrun --nproc_per_node 2 -m mto_ds pretrain --config configs/demo.yaml mto.enabled=true "
        "run.output_dir=study/mto-ep20-s0 run.seed=0 train.epochs=20 eval.every_epochs=5 eval.at_start=true "
        "data.synthetic_images=512")
    base, mto = (set(p.argv) for p in planned[:2])
    assert base ^ mto == {"mto.enabled=false", "mto.enabled=true",
                          "run.output_dir=study/baseline-ep20-s0", "run.output_dir=study/mto-ep20-s0"}


def test_plan_runs_refuses_overrides_of_what_the_study_controls_and_uneven_eval_epochs():
    with pytest.raises(ValueError, match="run.seed"):
        plan_runs("c.yaml", Path("s"), epochs=[4], seeds=[0], overrides=["run.seed=3"])
    with pytest.raises(ValueError, match="train.steps"):  # it overrides train.epochs, the budget
        plan_runs("c.yaml", Path("s"), epochs=[4], seeds=[0], overrides=["train.steps=100"])
    with pytest.raises(ValueError, match="divide"):
        plan_runs("c.yaml", Path("s"), epochs=[10], seeds=[0], eval_every=3)


def test_plan_runs_defaults_to_about_ten_evaluations_for_any_budget():
    every = {n: plan_runs("configs/demo.yaml", Path("s"), epochs=[n], seeds=[0])[0].argv[-2]
             for n in (100, 25, 97, 199, 3)}
    assert every == {100: "eval.every_epochs=10", 25: "eval.every_epochs=3", 97: "eval.every_epochs=10",
                     199: "eval.every_epochs=20", 3: "eval.every_epochs=1"}
    # During training: every epoch up to 14, then 7 to 14 evaluations (documented in docs/STUDY.md);
    # the last epoch, where E does not divide the budget, is evaluated after training.
    during = {n: n // default_eval_every(n) for n in range(1, 2001)}
    assert all(during[n] == n for n in range(1, 15))
    assert min(during[n] for n in range(15, 2001)) == 7 and max(during[n] for n in range(15, 2001)) == 12
    deepspeed = plan_runs("configs/demo.yaml", Path("s"), epochs=[4], seeds=[0], launcher="deepspeed --num_gpus 8")
    assert deepspeed[0].argv[:5] == ["deepspeed", "--num_gpus", "8", "--module", "mto_ds"]


def test_run_mode_lists_numbered_commands_for_a_slurm_array(tmp_path, capsys):
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(tmp_path), "--epochs", "4",
                         "--seeds", "0", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"]
    assert "mto.enabled=false" in lines[0] and "mto.enabled=true" in lines[1]


def fake_checkpoint(run_dir: Path, step: int) -> None:
    """A complete checkpoint as far as choosing one goes: its tag directory and marker."""
    tag_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "complete.json").write_text(json.dumps({"step": step, "time": 1000.0 + step}))


def test_final_evaluation_writes_a_row_at_the_budget_and_reuses_it(tmp_path, monkeypatch):
    run_dir = fake_run(tmp_path / "m", mto=True, knn=MTO_KNN)
    fake_checkpoint(run_dir, 20)
    calls = []

    def fake_run_eval(cfg, checkpoint, finetune_epochs, device=None):
        calls.append((checkpoint, finetune_epochs, cfg.mto.enabled))
        return {"knn_top1": 71.0, "linear_top1": 75.0, "finetune_top1": 80.0}

    monkeypatch.setattr("mto_ds.eval.run.run_eval", fake_run_eval)
    row = final_evaluation(run_dir, finetune_epochs=3)
    assert row["epoch"] == 4.0 and row["finetune_top1"] == 80.0
    assert final_evaluation(run_dir, finetune_epochs=3) == row
    assert calls == [(str(run_dir), 3, True)]
    assert load_run(run_dir).curve("finetune_top1") == ([4.0], [80.0])
    assert load_run(run_dir).curve("knn_top1")[1][-1] == 71.0
    assert study_module.FINAL_EVAL == "final_eval.json"


def test_final_evaluation_is_reused_only_under_the_settings_and_checkpoint_it_was_computed_from(
        tmp_path, monkeypatch):
    run_dir = fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN)
    fake_checkpoint(run_dir, 20)
    calls = []

    def fake_run_eval(cfg, checkpoint, finetune_epochs, device=None):
        calls.append((cfg.eval.pooling, finetune_epochs))
        result = {"knn_top1": float(len(calls)), "linear_top1": 50.0}  # which evaluation made the row
        return {**result, "finetune_top1": 60.0} if finetune_epochs else result

    def set_pooling(pooling):
        cfg = load_config(run_dir / "config.yaml")
        cfg.eval.pooling = pooling
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    monkeypatch.setattr("mto_ds.eval.run.run_eval", fake_run_eval)
    (run_dir / "final_eval.json").write_text(json.dumps({"epoch": 4.0, "knn_top1": 99.0, "linear_top1": 99.0}))
    assert final_evaluation(run_dir)["knn_top1"] == 1.0  # a row that does not say what it came from
    assert final_evaluation(run_dir)["knn_top1"] == 1.0 and len(calls) == 1

    set_pooling("cls")
    row = final_evaluation(run_dir)
    assert row["knn_top1"] == 2.0 and row["settings"]["eval"]["pooling"] == "cls"
    assert final_evaluation(run_dir)["knn_top1"] == 2.0 and len(calls) == 2

    fake_checkpoint(run_dir, 25)  # a newer checkpoint is what run_eval would load now
    row = final_evaluation(run_dir)
    assert row["knn_top1"] == 3.0 and row["settings"]["checkpoint"]["tag"] == "step_00000025"

    assert final_evaluation(run_dir, finetune_epochs=2)["knn_top1"] == 4.0
    assert final_evaluation(run_dir)["knn_top1"] == 4.0  # its fine-tune does not change the rest
    assert final_evaluation(run_dir, finetune_epochs=3)["knn_top1"] == 5.0
    assert calls == [("mean", 0), ("cls", 0), ("cls", 0), ("cls", 2), ("cls", 3)]
    assert load_run(run_dir).curve("knn_top1")[1][-1] == 5.0
    # Nothing computed is lost: each replaced row, the 2-epoch fine-tune's too, is kept in order.
    superseded = [json.loads(line) for line in (run_dir / "final_eval.superseded.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] for r in superseded] == [99.0, 1.0, 2.0, 3.0, 4.0]
    assert superseded[-1]["finetune_top1"] == 60.0 and superseded[-1]["settings"]["finetune_epochs"] == 2

    # The checkpoints deleted since: the row still serves the same settings, with a warning ...
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.warns(UserWarning, match="no complete checkpoint left; using its final_eval.json of checkpoint"):
        assert final_evaluation(run_dir, finetune_epochs=3)["knn_top1"] == 5.0
    # ... and other settings, which nothing could compute now, are an error collect can report.
    set_pooling("mean")
    with pytest.raises(RuntimeError, match="no complete checkpoint to evaluate, and no final_eval.json computed "
                                           "with the same evaluation settings"):
        final_evaluation(run_dir)
    assert len(calls) == 5


# --- what the audit found: a run counts as finished only when state.json says so -------------
def test_a_hard_killed_run_gives_no_budget_point_and_is_flagged_in_a_periodic_curve(tmp_path):
    # Killed hard (no state.json) after 3 of its 4 epochs, evaluated at 3 and at 2: neither is a budget's point.
    fake_run(tmp_path / "baseline-ep4", mto=False, epochs=3, budget=4, knn={2: 45.0, 3: 55.0}, finished=None)
    fake_run(tmp_path / "baseline-ep2", mto=False, epochs=2, knn={2: 40.0})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])], mode="budget")
    assert study.curves[0]["baseline"] == ([2.0], [40.0])
    note = next(w for w in study.warnings if "baseline-ep4" in w)
    assert "no state.json" in note and "3 of 4 epochs trained" in note and "left out" in note
    assert "resume it by running the same command again" in note

    periodic = assemble([load_run(tmp_path / "baseline-ep4")], mode="periodic")
    assert periodic.curves[0]["baseline"] == ([2.0, 3.0], [45.0, 55.0])
    assert any("unfinished: no state.json" in w and "its curve ends at epoch 3" in w for w in periodic.warnings)


def test_final_evaluation_refuses_a_run_that_did_not_finish(tmp_path, monkeypatch):
    run_dir = fake_run(tmp_path / "m", mto=True, epochs=2, budget=4, knn={2: 60.0}, finished=None)
    fake_checkpoint(run_dir, 10)  # step 10 of 20: evaluating it as epoch 4 would be a wrong point
    monkeypatch.setattr("mto_ds.eval.run.run_eval", lambda *a, **k: pytest.fail("evaluated an unfinished run"))
    with pytest.raises(RuntimeError, match="no state.json.*not evaluated as if at its budget of 4 epochs"):
        final_evaluation(run_dir)
    (run_dir / "state.json").write_text(json.dumps({"finished": False, "step": 10, "reason": "signal SIGUSR1"}))
    with pytest.raises(RuntimeError, match="signal SIGUSR1"):
        final_evaluation(run_dir)
    assert not (run_dir / "final_eval.json").exists()


def test_a_run_that_failed_at_set_up_is_reported_as_such(tmp_path):
    run_dir = tmp_path / "baseline-ep4-s0"
    fake_run(run_dir, mto=False, epochs=4)
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "state.json").write_text(json.dumps({"finished": False, "step": None, "total_steps": None,
                                                    "reason": "set-up failed: ConfigError: bad data.path"}))
    study = assemble([load_run(run_dir)])
    assert study.warnings == [f"{run_dir}: set-up failed (state.json: set-up failed: ConfigError: bad data.path), "
                              "nothing trained; it has no curve: fix what failed, then run the same command again"]


def test_warnings_name_the_command_that_evaluates_at_the_end(tmp_path):
    # configs/vit_*.yaml have eval.every_epochs=0: a sweep of them has no evaluation during training.
    for budget in (2, 4):
        fake_run(tmp_path / f"baseline-ep{budget}", mto=False, epochs=budget)
    fake_run(tmp_path / "baseline-ep3", mto=False, epochs=3, knn={1: 30.0})
    notes = assemble([load_run(d) for d in find_run_dirs([tmp_path])]).warnings
    assert any("baseline-ep2: no knn_top1 evaluation" in w and "collect --final-eval` evaluates" in w for w in notes)
    assert any("baseline-ep3: last knn_top1 evaluation at epoch 1" in w and "collect --final-eval" in w for w in notes)
    assert not any("epoch_study.py final " in w for w in notes)
    finetune = assemble([load_run(tmp_path / "baseline-ep2")], metric="finetune_top1").warnings
    assert any("collect --final-eval --finetune-epochs N" in w for w in finetune)


# --- finding runs and the collect command's errors -------------------------------------------
def test_a_study_under_a_folder_named_checkpoints_is_found(tmp_path):
    study_dir = tmp_path / "checkpoints" / "study"
    run_dir = fake_run(study_dir / "b", mto=False, knn=BASELINE_KNN)
    (run_dir / "checkpoints" / "step_00000020").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000020" / "config.yaml").write_text("{}")  # inside a run: not a run
    assert find_run_dirs([study_dir]) == [run_dir]


def test_a_run_given_twice_to_collect_counts_once(tmp_path, capsys):
    for budget in (2, 4):
        fake_run(tmp_path / "s" / f"mto-ep{budget}-s0", mto=True, epochs=budget, knn={budget: MTO_KNN[budget]})
    assert find_run_dirs([tmp_path / "s", tmp_path / "s" / "mto-ep2-s0"]) == [
        tmp_path / "s" / "mto-ep2-s0", tmp_path / "s" / "mto-ep4-s0"]
    assert _tool().main(["collect", str(tmp_path / "s"), str(tmp_path / "s" / "mto-ep2-s0"),
                         "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["curves"]["0"]["mto"]["epochs"] == [2, 4]


@pytest.mark.parametrize("args, problem", [
    (["collect", "{tmp}/missing", "--out", "{tmp}/r"], "missing does not exist"),
    (["collect", "{tmp}/empty", "--out", "{tmp}/r"], "no run directories (with config.yaml) under"),
    (["collect", "{tmp}/sweep", "--out", "{tmp}/r", "--curve", "periodic"], "use --curve budget"),
    (["collect", "{tmp}/sweep", "--out", "{tmp}/r", "--finetune-epochs", "2"], "add --final-eval"),
    (["collect", "{tmp}/sweep", "--out", "{tmp}/r", "--set", "eval.knn_k=5"], "--set changes how the final"),
    (["collect", "{tmp}/sweep", "--out", "{tmp}/r", "--final-eval", "--set", "model.arch=vit_large_patch16"],
     "--set takes eval.KEY=VALUE or data.num_workers=N"),
    (["collect", "{tmp}/sweep", "--out", "{tmp}/r", "--final-eval", "--set", "eval.knn_kk=5"], "eval.knn_kk"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "10", "--eval-every", "3"],
     "--eval-every 3 does not divide the budget 10"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "10", "--eval-every", "0"],
     "--eval-every must be >= 1"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "10", "--eval-every", "-2"],
     "--eval-every must be >= 1"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "4", "train.epochs=8"],
     "sets train.epochs, which the study controls"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "2", "2"], "--epochs 2 given more"),
    (["run", "--config", "configs/demo.yaml", "--out", "{tmp}/s", "--epochs", "2", "--seeds", "0", "0"],
     "--seeds 0 given more than once"),
])
def test_user_errors_end_with_a_message_naming_the_problem_and_exit_2(tmp_path, capsys, args, problem):
    (tmp_path / "empty").mkdir()
    for budget in (2, 4):
        fake_run(tmp_path / "sweep" / f"baseline-ep{budget}", mto=False, epochs=budget, knn={budget: 50.0})
    assert _tool().main([a.replace("{tmp}", str(tmp_path)) for a in args + ["--list"] * (args[0] == "run")]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err and err.startswith(f"epoch_study.py {args[0]}: error:")


def test_plan_runs_refuses_repeated_budgets_and_seeds_and_non_positive_values():
    with pytest.raises(StudyError, match="--epochs 2 given more than once"):
        plan_runs("c.yaml", Path("s"), epochs=[2, 4, 2], seeds=[0])
    with pytest.raises(StudyError, match="--seeds 1 given more than once"):
        plan_runs("c.yaml", Path("s"), epochs=[2], seeds=[1, 1])
    with pytest.raises(StudyError, match="--epochs must be whole numbers of epochs >= 1, got 0"):
        plan_runs("c.yaml", Path("s"), epochs=[0], seeds=[0])
    with pytest.raises(StudyError, match="got 0; leave it out"):
        plan_runs("c.yaml", Path("s"), epochs=[4], seeds=[0], eval_every=0)


def test_overrides_right_after_epochs_or_seeds_are_overrides(tmp_path, capsys):
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(tmp_path), "--epochs", "4",
                         "data.synthetic_images=512", "--seeds", "3", "run.log_every=2", "--list",
                         "eval.num_val=64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("run.seed=3 train.epochs=4" in line for line in lines)
    assert all(line.endswith("data.synthetic_images=512 run.log_every=2 eval.num_val=64") for line in lines)
    with pytest.raises(SystemExit) as exited:  # argparse's own error exit
        _tool().main(["run", "--config", "c.yaml", "--out", str(tmp_path), "--epochs", "4", "x", "--list"])
    assert exited.value.code == 2
    assert "'x' is neither a whole number nor a section.key=value override" in capsys.readouterr().err


# --- the run command: what it starts, skips, refuses and stops --------------------------------
FAKE_TRAINER = '''
import json, os, pathlib, signal, sys, time
from mto_ds.config import load_config, to_yaml
args = sys.argv[sys.argv.index("--config") + 1:]
cfg = load_config(args[0], args[1:])
run_dir = pathlib.Path(cfg.run.output_dir)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "config.yaml").write_text(to_yaml(cfg))
log = pathlib.Path(os.environ["FAKE_TRAINER_LOG"])

def stop(signum, frame):
    time.sleep(0.5)  # saving a checkpoint; the study must wait for it
    with log.open("a") as f:
        f.write(f"{run_dir.name} checkpointed on {signal.Signals(signum).name}\\n")
    sys.exit(0)

if os.environ.get("FAKE_TRAINER_WAIT"):  # before "started": a test signals once it reads that
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
with log.open("a") as f:
    f.write(f"{run_dir.name} started {os.getpid()}\\n")
if os.environ.get("FAKE_TRAINER_WAIT"):
    time.sleep(60)
epochs, every = cfg.train.epochs, cfg.eval.every_epochs
rows = [{"step": e, "epoch": float(e), "heterogeneity": [0.5]} for e in range(1, epochs + 1)]
rows += [{"step": e, "epoch": float(e), "knn_top1": 3.0 * e + cfg.mto.enabled} for e in range(every, epochs + 1, every)]
(run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
finished = not os.environ.get("FAKE_TRAINER_STOPPED")  # as if the trainer alone got a SIGTERM
(run_dir / "state.json").write_text(json.dumps({"finished": finished, "step": epochs,
                                               "reason": "completed" if finished else "signal SIGTERM"}))
'''


def _fake_trainer(tmp_path: Path, monkeypatch) -> str:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(tmp_path / "trainer.log"))
    return f"{sys.executable} {script}"


def _trainer_log(tmp_path: Path) -> list:
    log = tmp_path / "trainer.log"
    return [" ".join(line.split()[:2]) for line in log.read_text().splitlines()] if log.is_file() else []


def test_run_evaluates_the_last_epoch_skips_finished_runs_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    tool, out = _tool(), tmp_path / "study"
    evaluated = []

    def fake_final_evaluation(run_dir, finetune_epochs=0, overrides=()):
        evaluated.append(Path(run_dir).name)
        row = {"epoch": 17.0, "knn_top1": 60.0, "linear_top1": 65.0}
        (Path(run_dir) / "final_eval.json").write_text(json.dumps(row))
        return row

    monkeypatch.setattr("mto_ds.eval.study_runs.final_evaluation", fake_final_evaluation)
    command = ["run", "--config", "configs/demo.yaml", "--out", str(out), "--epochs", "17",
               "data.synthetic_images=512", "--launcher", _fake_trainer(tmp_path, monkeypatch)]
    # 17 epochs: the default E is 2, which ends at 16; the last epoch is evaluated after training.
    assert tool.main(command) == 0
    assert _trainer_log(tmp_path) == ["baseline-ep17-s0 started", "mto-ep17-s0 started"]
    assert evaluated == ["baseline-ep17-s0", "mto-ep17-s0"]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["curves"]["0"]["baseline"]["epochs"] == [2, 4, 6, 8, 10, 12, 14, 16, 17]

    capsys.readouterr()
    assert tool.main(command) == 0  # again: nothing is trained or evaluated twice
    assert len(_trainer_log(tmp_path)) == 2 and len(evaluated) == 2
    assert "== baseline-ep17-s0: finished (state.json), skipped" in capsys.readouterr().out

    (out / "mto-ep17-s0" / "state.json").unlink()  # an unfinished run would resume: with other data, refused
    assert tool.main([*command[:-3], "data.synthetic_images=1024", *command[-2:]]) == 2
    err = capsys.readouterr().err
    assert "baseline-ep17-s0: data.synthetic_images: 512 vs 1024" in err
    assert "mto-ep17-s0: data.synthetic_images: 512 vs 1024" in err and "new --out" in err
    assert len(_trainer_log(tmp_path)) == 2

    # Another budget into the same --out: its report is of its own runs, a periodic curve, not a
    # budget curve mixing in the 17-epoch runs; those are named.
    assert tool.main([*command[:6], "8", *command[7:]]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["mode"] == "periodic" and summary["curves"]["0"]["baseline"]["epochs"] == [1, 2, 3, 4, 5, 6, 7, 8]
    err = capsys.readouterr().err
    assert "left out of this report, not runs of this command" in err and "baseline-ep17-s0" in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_to_the_study_reaches_the_trainer_and_stops_the_study(tmp_path, monkeypatch, stop):
    launcher = _fake_trainer(tmp_path, monkeypatch)
    env = {**os.environ, "FAKE_TRAINER_WAIT": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, str(TOOL), "run", "--config", "configs/demo.yaml", "--out",
                               str(tmp_path / "study"), "--epochs", "2", "--launcher", launcher],
                              env=env, cwd=TOOL.parents[1], stderr=subprocess.PIPE, text=True)
    trainer_pid = None
    try:
        for _ in range(300):  # the first trainer is up (and has its handlers)
            if _trainer_log(tmp_path):
                trainer_pid = int((tmp_path / "trainer.log").read_text().split()[2])
                break
            time.sleep(0.1)
        assert trainer_pid, "the fake trainer did not start"
        time.sleep(0.3)
        driver.send_signal(stop)
        _, err = driver.communicate(timeout=30)
        assert driver.returncode == 128 + stop
        assert f"study stopped by {stop.name}; no further run started" in err
        if stop != signal.SIGINT:  # the fake trainer checkpoints on these, as the real one does
            assert _trainer_log(tmp_path) == ["baseline-ep2-s0 started", "baseline-ep2-s0 checkpointed"]
        else:
            assert _trainer_log(tmp_path) == ["baseline-ep2-s0 started"]
        with pytest.raises(ProcessLookupError):  # gone, not left running on its own
            os.kill(trainer_pid, 0)
    finally:
        if driver.poll() is None:
            driver.kill()
        if trainer_pid:
            try:
                os.kill(trainer_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_bad_override_is_refused_before_any_run_starts(tmp_path, monkeypatch, capsys):
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(tmp_path / "s"), "--epochs", "2",
                         "data.no_such_key=1", "--launcher", _fake_trainer(tmp_path, monkeypatch)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epoch_study.py run: error:") and "data.no_such_key" in err
    assert _trainer_log(tmp_path) == []


def test_a_trainer_that_exits_unfinished_stops_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TRAINER_STOPPED", "1")
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(tmp_path / "s"), "--epochs", "2",
                         "--launcher", _fake_trainer(tmp_path, monkeypatch)]) == 1
    assert _trainer_log(tmp_path) == ["baseline-ep2-s0 started"]
    assert "baseline-ep2-s0 exited without finishing (state.json: signal SIGTERM)" in capsys.readouterr().err


def test_a_launcher_not_on_path_is_refused_naming_it_before_any_run_starts(tmp_path, monkeypatch, capsys):
    # Copying STUDY.md's `--launcher "torchrun ..."` without the venv on PATH gave a
    # FileNotFoundError traceback from subprocess (exit 1) instead of a usage error.
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    out = tmp_path / "s"
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(out), "--epochs", "2",
                         "--launcher", "torchrun --nproc_per_node 2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epoch_study.py run: error: --launcher") and "'torchrun' not found on PATH" in err
    assert "Traceback" not in err and not out.exists()


# --- what the second audit found: stale or unlike final evaluations, incomplete seeds ---------
def _markdown_rows(study) -> dict:
    """The numbers table's rows of summary.md (not its header), by their label."""
    text = study_report.summary_markdown(study, "c.png", "h.png")
    rows = [line for line in text[:text.index("![")].splitlines() if line.startswith("| ")][1:]
    return {line.split(" | ")[0][2:]: line for line in rows}


def _write_final_eval(run_dir: Path, epoch: float, knn: float, settings=None, **metrics) -> None:
    row = {"epoch": epoch, "knn_top1": knn, "linear_top1": knn + 5, **metrics}
    (run_dir / "final_eval.json").write_text(json.dumps({**row, **({"settings": settings} if settings else {})}))


def test_collect_does_not_use_the_final_eval_row_of_a_run_it_could_not_evaluate_again(tmp_path, monkeypatch):
    study_dir = tmp_path / "s"
    fake_run(study_dir / "baseline-ep4-s0", mto=False, knn=BASELINE_KNN)
    mto_dir = fake_run(study_dir / "mto-ep4-s0", mto=True, knn={e: MTO_KNN[e] for e in (1, 2, 3)})
    _write_final_eval(mto_dir, 4.0, 99.0)  # from before: its checkpoint has been deleted since

    def fake_final_evaluation(run_dir, finetune_epochs=0, overrides=()):
        if Path(run_dir).name.startswith("mto"):
            raise RuntimeError(f"{run_dir} has no complete checkpoint to evaluate, and no final_eval.json "
                               "computed with the same evaluation settings")
        return {"epoch": 4.0, "knn_top1": 60.0, "linear_top1": 65.0}

    monkeypatch.setattr("mto_ds.eval.study_runs.final_evaluation", fake_final_evaluation)
    assert _tool().main(["collect", str(study_dir), "--out", str(tmp_path / "r"), "--final-eval"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["curves"]["0"]["mto"] == {"epochs": [1.0, 2.0, 3.0], "values": [40.0, 60.0, 65.0]}
    note = next(w for w in summary["warnings"] if str(mto_dir) in w and "final_eval.json" in w)
    assert "not used" in note and "has no complete checkpoint to evaluate" in note
    assert load_run(mto_dir, final_eval=False).curve("knn_top1")[0] == [1.0, 2.0, 3.0]


def test_final_eval_rows_computed_with_other_settings_are_refused_naming_the_runs_and_keys(tmp_path):
    settings = {"protocol": 2, "eval": {"pooling": "mean", "knn_k": 20}, "seed": 0, "finetune_epochs": 0,
                "checkpoint": {"tag": "step_00000020"}}
    base = fake_run(tmp_path / "baseline-ep4-s0", mto=False)
    mto = fake_run(tmp_path / "mto-ep4-s0", mto=True)
    _write_final_eval(base, 4.0, 60.0, settings, finetune_top1=70.0)
    # Another checkpoint, seed and fine-tune length: the k-NN numbers are still computed alike.
    _write_final_eval(mto, 4.0, 70.0, {**settings, "seed": 3, "finetune_epochs": 2,
                                       "checkpoint": {"tag": "step_00000025"}}, finetune_top1=75.0)
    runs = [load_run(base), load_run(mto)]
    assert assemble(runs).numbers["seed 0"]["mto_final_top1"] == 70.0
    with pytest.raises(StudyError, match=r"baseline-ep4-s0 and .*mto-ep4-s0.*finetune_epochs: 0 vs 2.*"
                                         r"collect --final-eval --finetune-epochs N` evaluates them all alike"):
        assemble(runs, metric="finetune_top1")

    _write_final_eval(mto, 4.0, 70.0, {**settings, "eval": {"pooling": "cls", "knn_k": 20}})
    with pytest.raises(StudyError, match=r"eval.pooling: 'mean' vs 'cls'.*come from the runs' own config.yaml: "
                                         r"`tools/epoch_study.py collect --final-eval --set eval.KEY=VALUE"):
        assemble([load_run(base), load_run(mto)])
    _write_final_eval(mto, 4.0, 70.0, {**settings, "model": {"arch": "vit_large_patch16"}})
    with pytest.raises(StudyError, match=r"model.arch: None vs 'vit_large_patch16'.*pre-trained other models"):
        assemble([load_run(base), load_run(mto)])
    # A fine-tune setting does not make k-NN rows unlike.
    _write_final_eval(mto, 4.0, 70.0, {**settings, "eval": {**settings["eval"], "finetune_lr": 0.5}})
    assert assemble([load_run(base), load_run(mto)]).numbers["seed 0"]["mto_final_top1"] == 70.0
    _write_final_eval(mto, 4.0, 70.0)  # an older file, without settings: not known to be alike
    with pytest.raises(StudyError, match=r"mto-ep4-s0.*no settings"):
        assemble([load_run(base), load_run(mto)])
    _write_final_eval(base, 4.0, 60.0)  # neither says: compared as such, alike
    assert assemble([load_run(base), load_run(mto)]).numbers["seed 0"]["rauc"] is None


def test_collect_skips_runs_it_cannot_evaluate_and_set_gives_the_evaluation_folders(tmp_path, monkeypatch, capsys):
    """The documented sweep: configs/vit_*.yaml pre-train on an FFCV file without eval.path. A run
    whose evaluation images are not found was a traceback that lost the whole report."""
    study_dir = tmp_path / "sweep"
    for mto in (False, True):
        run_dir = fake_run(study_dir / f"{'mto' if mto else 'baseline'}-ep4-s0", mto=mto)
        _set_config(run_dir, "data", "path", "train.beton")
        _set_config(run_dir, "data", "source", "ffcv")
        fake_checkpoint(run_dir, 20)
    out = ["--out", str(tmp_path / "r"), "--final-eval"]
    assert _tool().main(["collect", str(study_dir), *out]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped:") == 2 and "set eval.path" in err and "collect --set eval.path=DIR" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert sum("final evaluation skipped" in w for w in summary["warnings"]) == 2

    seen = []

    def fake_run_eval(cfg, checkpoint, finetune_epochs, device=None):
        seen.append((cfg.eval.path, cfg.data.num_workers))
        return {"knn_top1": 60.0 + 10 * cfg.mto.enabled, "linear_top1": 65.0}

    monkeypatch.setattr("mto_ds.eval.run.run_eval", fake_run_eval)
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    # --set before and after the paths: each takes one value, never a run directory.
    assert _tool().main(["collect", "--final-eval", "--set", f"eval.path={tmp_path / 'imagenet'}", str(study_dir),
                         "--set", "data.num_workers=2", *out[:2]]) == 0
    assert seen == [(str(tmp_path / "imagenet"), 2)] * 2
    row = json.loads((study_dir / "mto-ep4-s0" / "final_eval.json").read_text())
    assert row["knn_top1"] == 70.0 and row["settings"]["images"]["root"] == str((tmp_path / "imagenet").resolve())
    assert not list(study_dir.rglob(".final_eval.json.partial"))


def test_a_curve_whose_final_evaluation_used_other_eval_settings_than_its_training_is_named(tmp_path):
    """collect --final-eval --set eval.num_train=... gives the budget's point another protocol than
    the evaluations during training on the same curve: warned, naming the keys."""
    base = fake_run(tmp_path / "baseline-ep4-s0", mto=False, knn={e: BASELINE_KNN[e] for e in (1, 2, 3)})
    mto = fake_run(tmp_path / "mto-ep4-s0", mto=True, knn={e: MTO_KNN[e] for e in (1, 2, 3)})
    same = {"eval": {"num_train": 1024, "knn_k": 20, "every_epochs": 3}}
    _write_final_eval(base, 4.0, 80.0, {"eval": {"num_train": 10000, "knn_k": 20}})
    _write_final_eval(mto, 4.0, 85.0, {"eval": {"num_train": 10000, "knn_k": 20}})
    notes = [w for w in assemble([load_run(base), load_run(mto)]).warnings if "mixes the two" in w]
    assert len(notes) == 2 and all("eval.num_train: 1024 vs 10000" in w for w in notes)
    _write_final_eval(base, 4.0, 80.0, same)  # the config's own values (every_epochs is not compared)
    _write_final_eval(mto, 4.0, 85.0, same)
    assert not any("mixes the two" in w for w in assemble([load_run(base), load_run(mto)]).warnings)


def test_a_final_eval_file_cut_short_is_left_out_with_a_warning_and_evaluated_again(tmp_path, monkeypatch):
    run_dir = fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN)
    fake_checkpoint(run_dir, 20)
    (run_dir / "final_eval.json").write_text('{"epoch": 4.0, "knn_to')
    with pytest.warns(UserWarning, match="final_eval.json: not JSON"):
        assert load_run(run_dir).curve("knn_top1")[1][-1] == 60.0
    monkeypatch.setattr("mto_ds.eval.run.run_eval", lambda *a, **k: {"knn_top1": 61.0, "linear_top1": 66.0})
    with pytest.warns(UserWarning, match="not JSON"):
        assert final_evaluation(run_dir)["knn_top1"] == 61.0
    assert json.loads((run_dir / "final_eval.json").read_text())["knn_top1"] == 61.0


def test_a_repeated_epoch_row_replaces_the_earlier_one_whole(tmp_path):
    # Resumed from epoch 2: epoch 3 evaluated again, and only its k-NN logged this time.
    extra = [{"step": 15, "epoch": 3.0, "knn_top1": 99.0}]
    run = load_run(fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN, extra_rows=extra))
    assert run.curve("knn_top1") == ([1.0, 2.0, 3.0, 4.0], [20.0, 40.0, 99.0, 60.0])
    assert run.curve("linear_top1") == ([1.0, 2.0, 4.0], [25.0, 45.0, 65.0])


def test_a_periodic_seed_with_an_unfinished_run_keeps_its_row_but_is_not_averaged(tmp_path, monkeypatch):
    from mto_ds.eval import plots
    fake_run(tmp_path / "baseline-ep4-s0", mto=False, seed=0, knn=BASELINE_KNN)
    fake_run(tmp_path / "mto-ep4-s0", mto=True, seed=0, knn=MTO_KNN)
    # Killed at epoch 3 of 4: its "final" accuracy is mid-schedule.
    fake_run(tmp_path / "baseline-ep4-s1", mto=False, seed=1, epochs=3, budget=4,
             knn={e: BASELINE_KNN[e] for e in (1, 2, 3)}, finished=False)
    fake_run(tmp_path / "mto-ep4-s1", mto=True, seed=1, knn=MTO_KNN)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.seeds == [0]
    assert study.numbers["mean"] == study.numbers["seed 0"] and "std over seeds" not in study.numbers
    assert study.numbers["seed 1"]["baseline_final_top1"] == 50.0  # its own row stays
    why = "baseline-ep4-s1 unfinished (state.json: signal SIGTERM), 3 of 4 epochs trained"
    rows = _markdown_rows(study)
    assert f"seed 1 (not in the mean: {why})" in rows
    assert not any(label.startswith(("mean", "std")) for label in rows)  # a mean of 1 seed is seed 0's row
    assert any(w.startswith("seed 1: not in the mean or the std over seeds") and why in w for w in study.warnings)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    paths = study_report.write_report(study, tmp_path / "report")
    labels = figures[0].axes[0].get_legend_handles_labels()[1]  # curves.png
    assert "MTO (mean of 1 seed)" in labels and "baseline, seed 1 (not in the mean)" in labels
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["seeds"] == [0] and summary["excluded_seeds"] == {"1": why}


def test_a_periodic_run_finished_but_last_evaluated_before_its_budget_is_named_and_not_averaged(tmp_path):
    """Collected runs launched directly (eval.every_epochs=3, train.epochs=4) end without an
    evaluation at their budget: their 'final' accuracy is of epoch 3, so the seed is flagged."""
    fake_run(tmp_path / "baseline-ep4-s0", mto=False, seed=0, knn=BASELINE_KNN)
    fake_run(tmp_path / "mto-ep4-s0", mto=True, seed=0, knn=MTO_KNN)
    fake_run(tmp_path / "baseline-ep4-s1", mto=False, seed=1, knn={e: BASELINE_KNN[e] for e in (1, 2, 3)})
    fake_run(tmp_path / "mto-ep4-s1", mto=True, seed=1, knn=MTO_KNN)
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.seeds == [0]
    assert study.excluded == {1: "baseline-ep4-s1 last evaluated at epoch 3 of 4"}
    assert study.numbers["seed 1"]["baseline_final_top1"] == 50.0  # its own row stays, flagged
    note = next(w for w in study.warnings if "baseline-ep4-s1:" in w)
    assert "finished at 4 epochs, but its last knn_top1 evaluation is at epoch 3" in note
    assert "collect --final-eval` evaluates its last checkpoint" in note


def test_a_budget_seed_without_a_point_at_every_budget_is_not_averaged(tmp_path):
    base = {0: {2: 50.0, 4: 60.0}, 1: {2: 52.0, 4: 62.0}, 2: {2: 48.0, 4: 58.0}, 3: {2: 40.0, 4: 50.0}}
    mto = {0: {2: 55.0, 4: 70.0}, 1: {2: 50.0, 4: 61.0}, 2: {2: 59.0, 4: 66.0}, 3: {2: 45.0, 4: 55.0}}
    for seed in base:
        for budget in (2, 4):
            killed = seed == 2 and budget == 4  # seed 2's MTO 4-epoch run: killed after 3 epochs
            fake_run(tmp_path / f"mto-ep{budget}-s{seed}", mto=True, seed=seed, epochs=3 if killed else budget,
                     budget=budget, knn={} if killed else {budget: mto[seed][budget]}, finished=not killed)
            unevaluated = seed == 3 and budget == 4  # finished, but no evaluation at its budget
            fake_run(tmp_path / f"baseline-ep{budget}-s{seed}", mto=False, seed=seed, epochs=budget,
                     knn={} if unevaluated else {budget: base[seed][budget]})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.mode == "budget" and study.seeds == [0, 1]
    assert study.excluded == {2: "mto-ep4-s2 unfinished (state.json: signal SIGTERM), 3 of 4 epochs trained",
                              3: "baseline-ep4-s3 has no knn_top1 at its budget 4"}
    assert study.mean_curves["mto"] == ([2.0, 4.0], [52.5, 65.5])
    assert study.numbers["mean"]["baseline_final_top1"] == 61.0
    assert study.numbers["std over seeds"]["baseline_final_top1"] == pytest.approx(2 / 2 ** 0.5)
    assert study.std_counts["rauc"] == 2
    rows = _markdown_rows(study)
    assert "mean of 2 seeds" in rows and "std over 2 seeds" in rows and "seed 0" in rows
    assert "seed 3 (not in the mean: baseline-ep4-s3 has no knn_top1 at its budget 4)" in rows


def test_no_mean_row_when_no_seed_is_complete(tmp_path):
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN)
    fake_run(tmp_path / "m", mto=True, epochs=2, budget=4, knn={1: 40.0, 2: 60.0}, finished=None)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    assert set(study.numbers) == {"seed 0"} and study.seeds == [] and study.mean_curves == {}
    assert any(w.startswith("no seed is complete") for w in study.warnings)
    assert "seed 0 (not in the mean: m unfinished: no state.json" in " ".join(_markdown_rows(study))


def _set_config(run_dir: Path, section: str, key: str, value) -> None:
    cfg = load_config(run_dir / "config.yaml")
    setattr(getattr(cfg, section), key, value)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


def test_runs_of_one_method_that_differ_across_budgets_or_seeds_are_reported(tmp_path):
    # The 4-epoch runs come from another sweep, at 5x the learning rate.
    for budget, blr in ((2, 1e-3), (4, 5e-3)):
        for method in ("baseline", "mto"):
            fake_run(tmp_path / "sweep" / f"{method}-ep{budget}-s0", mto=method == "mto", epochs=budget,
                     knn={budget: 50.0 + budget}, blr=blr)
    notes = assemble([load_run(d) for d in find_run_dirs([tmp_path / "sweep"])]).warnings
    for method in ("baseline", "mto"):
        assert (f"{method} runs {tmp_path}/sweep/{method}-ep2-s0 and {tmp_path}/sweep/{method}-ep4-s0 differ beyond "
                "seed and budget: train.blr: 0.001 vs 0.005") in notes
    # Seeds on other data: averaging them would mix two studies. MTO's own settings must match too.
    for seed in (0, 1):
        fake_run(tmp_path / "seeds" / f"b{seed}", mto=False, seed=seed, knn=BASELINE_KNN)
        fake_run(tmp_path / "seeds" / f"m{seed}", mto=True, seed=seed, knn=MTO_KNN)
    for run in ("b1", "m1"):
        _set_config(tmp_path / "seeds" / run, "data", "synthetic_classes", 100)
    _set_config(tmp_path / "seeds" / "m1", "mto", "lambda_e", 0.5)
    notes = assemble([load_run(d) for d in find_run_dirs([tmp_path / "seeds"])]).warnings
    assert any(w.startswith("baseline runs") and w.endswith("differ beyond seed and budget: "
                                                           "data.synthetic_classes: 10 vs 100") for w in notes)
    assert any(w.startswith("mto runs") and w.endswith("data.synthetic_classes: 10 vs 100; mto.lambda_e: 0.1 vs 0.5")
               for w in notes)


def test_the_summary_counts_its_warnings_right_under_the_definitions(tmp_path):
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN, blr=1e-3)
    fake_run(tmp_path / "m", mto=True, knn=MTO_KNN, blr=2e-3)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    lines = study_report.summary_markdown(study, "c.png", "h.png").splitlines()
    top = lines.index("Definitions (RAUC, epochs-to-baseline, epoch saving): docs/STUDY.md.")
    assert lines[top + 1:top + 3] == ["", f"**{len(study.warnings)} warning{'s' * (len(study.warnings) > 1)}** "
                                      "(end of this page): the numbers below may not mean what they say."]
    assert lines.index("## Warnings") > top + 3


@pytest.mark.parametrize("baseline_knn, mto_knn, cells", [
    # MTO is already past the baseline's final 60 at its first evaluation: it got there at epoch 1 or before.
    (BASELINE_KNN, {1: 60.0, 2: 65.0, 3: 66.0, 4: 70.0}, ["≤ 1.00", "4.00", "≥ 75.0 %"]),
    # The baseline was already at its final accuracy at epoch 1: its own epochs to it are a bound.
    ({1: 60.0, 2: 60.0, 3: 60.0, 4: 60.0}, {1: 40.0, 2: 60.0, 3: 65.0, 4: 70.0}, ["2.00", "≤ 1.00", "≤ -100.0 %"]),
    ({1: 60.0, 2: 60.0, 3: 60.0, 4: 60.0}, {1: 61.0, 2: 61.0, 3: 61.0, 4: 61.0},
     ["≤ 1.00", "≤ 1.00", "n/a (both bounds)"]),
])
def test_epochs_reached_at_the_first_evaluation_are_printed_as_bounds(tmp_path, baseline_knn, mto_knn, cells):
    fake_run(tmp_path / "b", mto=False, knn=baseline_knn)
    fake_run(tmp_path / "m", mto=True, knn=mto_knn)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    assert _markdown_rows(study)["seed 0"].split(" | ")[-3:] == [*cells[:2], cells[2] + " |"]


def test_the_summary_gives_the_mto_final_epoch_and_the_paired_final_difference(tmp_path):
    for seed, shift in ((0, 0.0), (1, 5.0)):  # MTO - baseline at epoch 4: +10 and +15
        fake_run(tmp_path / f"b{seed}", mto=False, seed=seed, knn=BASELINE_KNN)
        fake_run(tmp_path / f"m{seed}", mto=True, seed=seed, knn={e: v + shift for e, v in MTO_KNN.items()})
    study = assemble([load_run(d) for d in find_run_dirs([tmp_path])])
    assert study.numbers["seed 1"]["mto_minus_baseline_final_top1"] == 15.0
    assert study.numbers["mean"]["mto_minus_baseline_final_top1"] == 12.5
    spread = study.numbers["std over seeds"]
    assert spread["mto_minus_baseline_final_top1"] == pytest.approx(5 / 2 ** 0.5)
    assert not any(key.endswith("_is_bound") for key in spread)
    text = study_report.summary_markdown(study, "c.png", "h.png")
    assert "| MTO final | MTO final at epoch | MTO − baseline final | MTO epochs to baseline final |" in text
    assert "| seed 1 | 1.5000 | 60.00 | 4 | 75.00 | 4 | +15.00 | " in text
    assert "| std over 2 seeds | 0.0816 | 0.00 | 0 | 3.54 | 0 | 3.54 | " in text
    numbers = json.loads(study_report.write_report(study, tmp_path / "report")["summary.json"].read_text())["numbers"]
    assert numbers["seed 0"]["mto_final_epoch"] == 4.0 and numbers["seed 0"]["mto_minus_baseline_final_top1"] == 10.0
    assert numbers["seed 0"]["mto_epochs_to_baseline_is_bound"] is False


def test_a_one_seed_summary_has_no_mean_row_repeating_the_seed_row(tmp_path):
    fake_run(tmp_path / "b", mto=False, knn=BASELINE_KNN)
    fake_run(tmp_path / "m", mto=True, knn=MTO_KNN)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    assert study.numbers["mean"] == study.numbers["seed 0"]  # summary.json keeps it
    assert list(_markdown_rows(study)) == ["seed 0"]


def test_run_refuses_a_periodic_curve_over_several_budgets_before_any_training(tmp_path, monkeypatch, capsys):
    assert _tool().main(["run", "--config", "configs/demo.yaml", "--out", str(tmp_path / "s"), "--epochs", "2", "4",
                         "--curve", "periodic", "--launcher", _fake_trainer(tmp_path, monkeypatch)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epoch_study.py run: error:") and "--curve periodic" in err and "2 4" in err
    assert _trainer_log(tmp_path) == []
    with pytest.raises(StudyError, match="--curve periodic"):
        plan_runs("configs/demo.yaml", Path("s"), epochs=[2, 4], seeds=[0], curve="periodic")


def test_plan_runs_refuses_train_steps_set_in_the_config_file(tmp_path):
    config = tmp_path / "steps.yaml"
    config.write_text(f"_base_: {TOOL.parents[1] / 'configs' / 'demo.yaml'}\ntrain:\n  steps: 6\n")
    with pytest.raises(StudyError, match=r"steps.yaml sets train.steps=6, which overrides every budget"):
        plan_runs(str(config), tmp_path / "s", epochs=[4], seeds=[0])


@pytest.mark.parametrize("baseline, mto, says", [
    ({1: 100.0, 2: 100.0}, {1: 99.5, 2: 100.0}, "every knn_top1 evaluation is at 99 % or above"),
    ({1: 75.0, 2: 75.0}, {1: 75.0, 2: 75.0}, "every knn_top1 evaluation is 75 %"),
])
def test_a_metric_that_cannot_tell_the_encoders_apart_is_named_in_the_warnings(tmp_path, baseline, mto, says):
    """The demo's synthetic classes: a random encoder scores 100 % as a trained one does, and the
    study's numbers then compare noise; the report must say so, not print a RAUC of 1."""
    fake_run(tmp_path / "b", mto=False, epochs=2, knn=baseline)
    fake_run(tmp_path / "m", mto=True, epochs=2, knn=mto)
    study = assemble([load_run(tmp_path / "b"), load_run(tmp_path / "m")])
    assert any(w.startswith(says) and "saturated" in w for w in study.warnings)
    informative = assemble([load_run(d) for d in (fake_run(tmp_path / "b2", mto=False, knn=BASELINE_KNN),
                                                  fake_run(tmp_path / "m2", mto=True, knn=MTO_KNN))])
    assert not any("saturated" in w for w in informative.warnings)
