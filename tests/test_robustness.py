"""What a run does when things go wrong: a save killed midway, damaged checkpoints, non-finite
losses, a rank that dies under torchrun's elastic agent, the stop agreement; and the batch
settings that elastic resume relies on (the DeepSpeed files themselves: test_ds_configs.py).
Failures are injected with the MTO_DS_FAULT_* variables (mto_ds/engine/faults.py,
docs/ROBUSTNESS.md).
"""
import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mto_ds.config import ConfigError
from mto_ds.engine.builder import describe_batch, plan_batch
from mto_ds.engine.checkpoint import MARKER, Checkpointer, file_sizes, verify
from mto_ds.engine.faults import Faults
from mto_ds.models import create_mim_model

from conftest import HALF_PRECISION_SMALL, REPO, cpu_env, free_port, read_metrics
from run_control import STEPS, Run, losses_by_step, metric_steps, reference_run, state, tags


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _complete(run_dir, name):
    return (run_dir / "checkpoints" / name / MARKER).is_file()


# --- checkpoints: every N steps, keep the last K, kill -9 during a save, damaged files ----------

def test_checkpoints_every_n_steps_keep_only_the_last_k_complete_ones(reference):
    assert tags(reference) == ["step_00000006", "step_00000009", "step_00000012"]  # every 3, keep 3
    assert (reference / "checkpoints" / "latest").read_text() == "step_00000012"
    marker = json.loads((reference / "checkpoints" / "step_00000012" / MARKER).read_text())
    assert (marker["step"], marker["world_size"], marker["zero_stage"]) == (12, 2, 2)
    assert marker["files"] == file_sizes(reference / "checkpoints" / "step_00000012")
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory):
    """2 ranks; both stall inside the final save of step 12 (after DeepSpeed wrote its files,
    before complete.json) and the whole job gets kill -9 there."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    run = Run(run_dir, nproc=2, env={"MTO_DS_FAULT_SAVE_STALL": "12"})
    run.wait_for(lambda: run.output.count("fault injection: stalling") == 2, "both ranks stalling in the save")
    run.kill()
    after_kill = {"tags": tags(run_dir), "latest": (run_dir / "checkpoints" / "latest").read_text(),
                  "step_12_files": sorted(p.name for p in (run_dir / "checkpoints" / "step_00000012").iterdir())}
    return run_dir, after_kill


def test_save_killed_midway_is_never_taken_for_a_checkpoint(killed_in_save):
    run_dir, after_kill = killed_in_save
    assert after_kill["tags"] == ["step_00000003", "step_00000006", "step_00000009", "step_00000012"]
    assert after_kill["step_12_files"] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # written, never marked
    assert after_kill["latest"] == "step_00000009"
    assert Checkpointer(run_dir / "checkpoints", 3, 0, 2).candidates("auto")[0].name == "step_00000009"


def test_damaged_newest_checkpoints_are_skipped_with_a_warning_and_the_run_continues_exactly(
        killed_in_save, reference):
    """After the kill: step 12 is half-written, step 9 gets a truncated file, step 6 a file whose
    size is right but whose content is not. Resume must skip all three and continue from step 3,
    then log from step 4 on the losses of the run that was never interrupted."""
    run_dir, _ = killed_in_save
    ckpt = run_dir / "checkpoints"
    truncated = ckpt / "step_00000009" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)
    overwritten = ckpt / "step_00000006" / "mp_rank_00_model_states.pt"
    with open(overwritten, "r+b") as f:
        f.write(bytes(4096))
    run = Run(run_dir, nproc=2).finish()
    out = run.output
    assert (f"checkpoint {ckpt}/step_00000009 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt has "
            f"{size // 2} bytes, {size} when it was saved); falling back to the one before it") in out
    assert f"checkpoint {ckpt}/step_00000006 is damaged (" in out
    assert out.count("falling back to the one before it") == 2  # step 12 was never a candidate
    assert f"resumed from {ckpt}/step_00000003 at step 3" in out
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    # Each step once: rows logged after step 3 by the killed run were set aside, then re-logged.
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    superseded = (run_dir / "metrics.jsonl.superseded").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded] == list(range(4, STEPS + 1))
    assert losses_by_step(run_dir) == pytest.approx(losses_by_step(reference), rel=1e-5)
    # The damaged ones are set aside for inspection; the half-written save of step 12 was replaced.
    assert tags(run_dir) == ["step_00000006", "step_00000006.damaged", "step_00000009",
                             "step_00000009.damaged", "step_00000012"]
    assert all(_complete(run_dir, t) for t in ("step_00000006", "step_00000009", "step_00000012"))
    assert (ckpt / "step_00000009.damaged" / truncated.name).stat().st_size == size // 2


def test_verify_names_a_missing_or_truncated_file(tmp_path):
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    (tag / "a.pt").write_bytes(b"x" * 100)
    (tag / "b.pt").write_bytes(b"y" * 10)
    (tag / MARKER).write_text(json.dumps({"step": 4, "world_size": 1, "files": file_sizes(tag)}))
    assert verify(tag) is None
    (tag / "a.pt").write_bytes(b"x" * 60)
    assert verify(tag) == "a.pt has 60 bytes, 100 when it was saved"
    (tag / "a.pt").write_bytes(b"x" * 120)  # written over by another save: not this checkpoint either
    assert verify(tag) == "a.pt has 120 bytes, 100 when it was saved"
    (tag / "b.pt").unlink()
    (tag / "a.pt").write_bytes(b"x" * 100)
    assert verify(tag) == "b.pt is missing"
    (tag / MARKER).write_text('{"step": 4, "wor')
    assert verify(tag).startswith("unreadable complete.json")


def test_a_failed_conversion_stops_the_run_instead_of_setting_a_complete_checkpoint_aside(tmp_path, monkeypatch):
    """A complete checkpoint saved on 2 ranks, resumed on 1: if its universal conversion fails
    (disk full, out of memory), the run stops naming it; it does not fall back to step 3 and
    rename step 6 `.damaged`, which would lose steps 4-6 for a fault that is not the checkpoint's."""
    from mto_ds.engine import checkpoint as checkpoint_module
    ckpt = tmp_path / "checkpoints"
    for step in (3, 6):
        tag = ckpt / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "model.pt").write_bytes(b"x" * 10)
        (tag / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": file_sizes(tag)}))

    def no_space(tag_dir, out):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_module, "to_universal", no_space)
    checkpointer = Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="converting the complete checkpoint .*step_00000006 for 1 rank "
                                           "failed .*No space left on device"):
        checkpointer.load_newest(engine=None, candidates=checkpointer.candidates("auto"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000003", "step_00000006", "step_00000006_universal.failed"]


class _FilesEngine:
    """Stands in for DeepSpeed's engine: save_checkpoint writes a model and an optimizer file."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag / "zero").mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
        (Path(save_dir) / tag / "zero" / "optim_states.pt").write_bytes(b"o" * 100)


def test_a_save_is_flushed_to_storage_before_complete_json_names_it(tmp_path, monkeypatch):
    """Power lost after complete.json must not leave a 'complete' checkpoint whose files were
    still in the page cache: the node's process of local rank 0 fsyncs every file and folder of
    the save before rank 0 writes the marker; other processes of the node do not repeat it."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt = tmp_path / "checkpoints"
    tag = Checkpointer(ckpt, keep_last=2, rank=0, world_size=1).save(_FilesEngine(), 5, {}, {})
    data = [str(tag / "mp_rank_00_model_states.pt"), str(tag / "zero" / "optim_states.pt")]
    first_marker = next(i for i, path in enumerate(synced) if Path(path).name.startswith(MARKER))
    assert set(data) | {str(tag), str(tag / "zero")} <= set(synced[:first_marker])
    assert str(ckpt) in synced[first_marker:]  # the marker's rename, too
    assert verify(tag) is None and json.loads((tag / MARKER).read_text())["step"] == 5

    synced.clear()
    Checkpointer(tmp_path / "other", keep_last=2, rank=1, world_size=2, local_rank=1).save(_FilesEngine(), 5, {}, {})
    assert synced == []
    # The first process of a second node flushes that node's writes, though it is not rank 0.
    tag = Checkpointer(tmp_path / "node2", keep_last=2, rank=2, world_size=4, local_rank=0).save(
        _FilesEngine(), 5, {}, {})
    assert {str(tag / "mp_rank_00_model_states.pt"), str(tag / "zero" / "optim_states.pt")} <= set(synced)
    assert not (tag / MARKER).exists()  # rank 0 writes the marker

    # File systems that refuse fsync on a directory (EINVAL: CIFS, 9p) still save; a file's
    # fsync failing is an error.
    def no_directory_fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    tag = Checkpointer(tmp_path / "cifs", keep_last=2, rank=0, world_size=1).save(_FilesEngine(), 7, {}, {})
    assert verify(tag) is None

    # Any other error of a directory's fsync (EIO: the disk failed) is one.
    def failing_directory(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", failing_directory)
    with pytest.raises(OSError, match="Input/output error"):
        Checkpointer(tmp_path / "dir_eio", keep_last=2, rank=0, world_size=1).save(_FilesEngine(), 8, {}, {})
    assert not (tmp_path / "dir_eio" / "step_00000008" / MARKER).exists()

    def failing_disk(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        Checkpointer(tmp_path / "broken", keep_last=2, rank=0, world_size=1).save(_FilesEngine(), 9, {}, {})
    assert not (tmp_path / "broken" / "step_00000009" / MARKER).exists()


def test_pruning_keeps_the_newest_complete_ones_and_removes_unfinished_saves(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (ckpt / f"step_{step:08d}").mkdir(parents=True)
        (ckpt / f"step_{step:08d}" / MARKER).write_text(json.dumps({"step": step, "world_size": 2}))
    for name in ("step_00000005", "step_00000002_universal", "step_00000004_universal",
                 "step_00000004_universal.tmp", "step_00000007.damaged"):
        (ckpt / name).mkdir()
    # What a failed conversion left (a file): the record of a failure rank 0 has since retried past.
    for name in ("step_00000001_universal.failed", "step_00000004_universal.failed"):
        (ckpt / name).write_text("No space left on device")
    Checkpointer(ckpt, keep_last=2, rank=0, world_size=2)._prune()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "step_00000003", "step_00000004", "step_00000004_universal", "step_00000007.damaged"]


def test_pruning_never_takes_a_checkpoint_kept_for_good_and_status_names_them(tmp_path):
    """checkpoint.keep_every_epochs marks its saves `kept` in complete.json: an epoch study's
    checkpoints at epochs 100, 200, 400 outlive keep_last, and a later change of the setting does
    not delete those already kept. The others are pruned as before."""
    from mto_ds.engine.status import describe_status, read_run
    ckpt = tmp_path / "checkpoints"
    for step in range(1, 8):
        (ckpt / f"step_{step:08d}").mkdir(parents=True)
        marker = {"step": step, "world_size": 1, **({"kept": True} if step in (2, 4) else {})}
        (ckpt / f"step_{step:08d}" / MARKER).write_text(json.dumps(marker))
    # A kept one's conversion for another world size: as large as it, made again should a resume go back there.
    for name in ("step_00000002_universal", "step_00000007_universal"):
        (ckpt / name).mkdir()
    Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)._prune()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "step_00000002", "step_00000004", "step_00000006", "step_00000007", "step_00000007_universal"]
    status = read_run(tmp_path)
    assert status.checkpoints == [7, 6, 4, 2] and status.kept == [4, 2]
    assert "4 complete: step 7, 6, 4, ...; 2 kept for good: step 4, 2" in "\n".join(describe_status(status))


def test_a_file_system_that_cannot_hold_the_runs_checkpoints_is_warned_about_at_start(tmp_path, monkeypatch):
    """A save that finds the disk full stops the run hours in: the start (and --dry-run) warns when
    the free space, plus what the run's own checkpoints already hold, is less than the most its
    checkpoints take at once (keep_last, the save in flight and those kept for good)."""
    from collections import namedtuple
    from mto_ds.config import CheckpointConfig
    from mto_ds.engine import checkpoint as checkpoint_module
    from mto_ds.engine.checkpoint import checkpoint_space
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: Usage(10_000, 0, 1_000))
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    space = checkpoint_space(CheckpointConfig(keep_last=2, keep_every_epochs=4), bf16, params=10, epochs=9)
    assert (space.bytes_per_param, space.each, space.kept, space.at_once) == (14, 140, 2, 5 * 140)
    assert space.warning(tmp_path / "not" / "made" / "yet") == []  # 1000 bytes free: enough
    space = checkpoint_space(CheckpointConfig(keep_last=2, keep_every_epochs=4), bf16, params=20, epochs=9)
    (warning,) = space.warning(tmp_path / "run")
    assert warning == (f"run.output_dir={tmp_path / 'run'}: its file system has 1e-06 GB free, less than the "
                       "1.4e-06 GB its checkpoints take at once (about 2.8e-07 GB each); a save that finds the disk "
                       "full stops the run (checkpoint.keep_last, checkpoint.keep_every_epochs)")
    (tmp_path / "run" / "checkpoints" / "step_00000004.superseded").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004.superseded" / "model.pt").write_bytes(b"x" * 400)
    assert len(space.warning(tmp_path / "run")) == 1  # set aside for good: no room
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004" / "model.pt").write_bytes(b"x" * 400)
    assert space.warning(tmp_path / "run") == []  # what they hold is room for the next ones
    zero3 = checkpoint_space(CheckpointConfig(), {"zero_optimization": {"stage": 3}}, params=20, epochs=9)
    fp32 = checkpoint_space(CheckpointConfig(), {"zero_optimization": {"stage": 2}}, params=20, epochs=9)
    assert (zero3.bytes_per_param, fp32.bytes_per_param, fp32.kept, fp32.at_once) == (12, 16, 0, 4 * 320)


def test_checkpoints_newer_than_the_resume_point_are_set_aside_not_deleted(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        (ckpt / f"step_{step:08d}").mkdir(parents=True)
        (ckpt / f"step_{step:08d}" / MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
    (ckpt / "step_00000006_universal").mkdir()  # a conversion of a checkpoint set aside goes with it
    checkpointer = Checkpointer(ckpt, keep_last=1, rank=0, world_size=1)
    checkpointer.set_aside_newer_than(3, damaged=[ckpt / "step_00000009"])
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000003", "step_00000006.superseded",
                                                      "step_00000009.damaged"]
    assert checkpointer.candidates("auto") == [ckpt / "step_00000003"]


def _complete_tags(ckpt: Path, *steps: int, world_size: int = 1) -> None:
    for step in steps:
        (ckpt / f"step_{step:08d}").mkdir(parents=True)
        (ckpt / f"step_{step:08d}" / MARKER).write_text(json.dumps({"step": step, "world_size": world_size}))


def test_auto_after_a_resume_from_another_run_never_takes_the_history_that_resume_replaced(tmp_path):
    """checkpoint.resume=PATH of another run's step 5 keeps this run's own step 3 (older, so not
    set aside): a later job with resume=auto that comes before this run's first save continues from
    the other run's step 5 (not from its newer step 8, nor from step 3, a history left behind);
    once this run has saved, from its own checkpoints, with step 5 as the fallback."""
    ckpt, elsewhere = tmp_path / "run" / "checkpoints", tmp_path / "elsewhere" / "checkpoints"
    _complete_tags(ckpt, 3)
    _complete_tags(elsewhere, 5)
    checkpointer = Checkpointer(ckpt, keep_last=3, rank=0, world_size=1)
    assert checkpointer.candidates("auto") == [ckpt / "step_00000003"]  # nothing applied yet
    checkpointer.record_resume(str(elsewhere), step=5, env={})
    _complete_tags(elsewhere, 8)  # the other run went on
    assert checkpointer.candidates("auto") == [elsewhere / "step_00000005"]
    _complete_tags(ckpt, 9, 12)
    assert checkpointer.candidates("auto") == [ckpt / "step_00000012", ckpt / "step_00000009",
                                               elsewhere / "step_00000005"]
    shutil.rmtree(elsewhere)  # the other run deleted: its checkpoint is no fallback any more
    assert checkpointer.candidates("auto") == [ckpt / "step_00000012", ckpt / "step_00000009"]
    # A value inside this run's directory, or a start afresh: every own checkpoint is its history.
    for value, step in ((str(ckpt / "step_00000009"), 9), ("none", 0)):
        checkpointer.record_resume(value, step=step, env={})
        assert checkpointer.candidates("auto") == [ckpt / "step_00000012", ckpt / "step_00000009",
                                                   ckpt / "step_00000003"], value


def test_a_checkpoint_set_aside_never_replaces_one_set_aside_before_and_latest_follows_the_resume_point(tmp_path):
    """Two histories that both went past step 6 and were both left by a resume to step 3: each
    step 6 is kept (step_6.superseded, step_6.superseded.2), and `latest` names step 3 at once,
    not a checkpoint that was moved away."""
    ckpt = tmp_path / "checkpoints"
    checkpointer = Checkpointer(ckpt, keep_last=3, rank=0, world_size=1)
    _complete_tags(ckpt, 3, 6)
    (ckpt / "step_00000006" / "history").write_text("first")
    (ckpt / "latest").write_text("step_00000006")
    checkpointer.set_aside_newer_than(3, damaged=[])
    assert (ckpt / "latest").read_text() == "step_00000003"
    _complete_tags(ckpt, 6)
    (ckpt / "step_00000006" / "history").write_text("second")
    checkpointer.set_aside_newer_than(3, damaged=[])
    assert [(p.name, (p / "history").read_text()) for p in sorted(ckpt.glob("step_00000006*"))] == [
        ("step_00000006.superseded", "first"), ("step_00000006.superseded.2", "second")]
    # Starting over (step 0) leaves no checkpoint for `latest` to name.
    checkpointer.set_aside_newer_than(0, damaged=[])
    assert not (ckpt / "latest").exists()
    assert checkpointer.candidates("auto") == []


def test_a_start_from_scratch_sets_the_earlier_history_aside_so_a_later_auto_resume_cannot_take_it(tmp_path):
    """checkpoint.resume=none in a run directory that holds checkpoints: no candidates to load, and
    every earlier checkpoint is set aside; a crash before this start's first save must not resume
    the history it started over from."""
    ckpt = tmp_path / "checkpoints"
    _complete_tags(ckpt, 3, 6)
    checkpointer = Checkpointer(ckpt, keep_last=3, rank=0, world_size=1)
    assert checkpointer.load_newest(engine=None, candidates=checkpointer.candidates("none")) == (None, {})
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000003.superseded", "step_00000006.superseded"]
    assert checkpointer.candidates("auto") == []


@pytest.mark.parametrize("resume", ["none", "PATH"])
def test_an_explicit_resume_applies_once_per_job_and_the_jobs_restarts_continue_from_its_progress(tmp_path, resume):
    """`checkpoint.resume=none` (or a path) in a job's command is there again when Slurm requeues
    the job or torchrun restarts its workers. Applied again it would throw away each restart's
    progress, so a run that needs several time-limit windows could never finish: a restart of the
    job that applied it continues from the checkpoints saved since; a new job applies it again."""
    ckpt = tmp_path / "run" / "checkpoints"
    _complete_tags(tmp_path / "elsewhere", 5)
    if resume == "PATH":
        resume = str(tmp_path / "elsewhere" / "step_00000005")
        # The run's own earlier history, older than the checkpoint it is told to start from
        # (the start that applies the value sets aside only what is newer).
        _complete_tags(ckpt, 3)
    applied = [] if resume == "none" else [Path(resume)]
    checkpointer = Checkpointer(ckpt, keep_last=3, rank=0, world_size=1)
    first_start = {"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "0"}
    requeued = {"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "1"}
    assert checkpointer.candidates(resume, env=first_start) == applied
    # A restart before the first start recorded anything (it died in set-up) applies the value.
    assert checkpointer.candidates(resume, env=requeued) == applied
    checkpointer.record_resume(resume, step=0 if resume == "none" else 5, env=first_start)
    # Recorded, but nothing saved since: applying it again is the same start (step 3 is the
    # history the value replaced: continuing from it went back to that history unseen).
    assert checkpointer.candidates(resume, env=requeued) == applied
    _complete_tags(ckpt, 9, 12)
    # The job's first start again (its own srun of the same allocation): it applies the value.
    assert checkpointer.candidates(resume, env=first_start) == applied
    assert checkpointer.candidates(resume, env={"SLURM_JOB_ID": "41"}) == applied
    # The job's progress first; should it all be damaged, the value, never the older history.
    progress = [ckpt / "step_00000012", ckpt / "step_00000009"]
    assert checkpointer.candidates(resume, env=requeued) == progress + applied
    # The restart that continued keeps the record: a later requeue before any new save still
    # tells the job's progress from the older history.
    checkpointer.record_resume(resume, step=12, env=requeued)
    assert json.loads((ckpt / "resume_applied.json").read_text())["step"] == (0 if resume == "none" else 5)
    assert checkpointer.candidates(resume, env={"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "2"}) == progress + applied
    elastic = {"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "1"}
    checkpointer = Checkpointer(ckpt, keep_last=3, rank=0, world_size=1)  # another job's first start
    checkpointer.record_resume(resume, step=0 if resume == "none" else 5,
                               env={"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "0"})
    assert checkpointer.candidates(resume, env=elastic) == progress + applied
    # Applied again: by a new job, by a first start in the same allocation, by a plain process,
    # and for another value than the one recorded.
    for env in ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}, {"SLURM_JOB_ID": "41"}, {},
                {"TORCHELASTIC_RUN_ID": "r2", "TORCHELASTIC_RESTART_COUNT": "1"}):
        assert checkpointer.candidates(resume, env=env) == applied, env
    other = "none" if resume != "none" else str(tmp_path / "elsewhere")
    assert checkpointer.candidates(other, env=elastic) == ([] if other == "none" else [tmp_path / "elsewhere" / "step_00000005"])


def test_another_runs_checkpoint_is_converted_into_this_runs_directory(tmp_path, monkeypatch):
    """checkpoint.resume=PATH on another world size: the universal conversion goes to this run's
    checkpoints/, not beside the other run's checkpoint (whose directory may be read-only)."""
    from mto_ds.engine import checkpoint as checkpoint_module
    other = tmp_path / "other" / "checkpoints"
    _complete_tags(other, 4, world_size=2)
    written = []

    def convert(tag_dir, out):
        written.append((tag_dir, out))
        raise OSError(28, "No space left on device")  # stop here: the test is about where
    monkeypatch.setattr(checkpoint_module, "to_universal", convert)
    ckpt = tmp_path / "run" / "checkpoints"
    checkpointer = Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="No space left"):
        checkpointer.load_newest(engine=None, candidates=checkpointer.candidates(str(other / "step_00000004")))
    assert written == [(other / "step_00000004", ckpt / "step_00000004_universal")]
    assert sorted(p.name for p in other.iterdir()) == ["step_00000004"]


def _fake_ds_to_universal(tag_dir, out, run=None):
    """Writes what DeepSpeed's ds_to_universal writes, as it does: `latest_universal` names the
    folder it wrote (the .tmp one, later renamed)."""
    (out / "zero").mkdir(parents=True)
    (out / "zero" / "fp32.pt").write_bytes(b"u" * 5)
    (out.parent / "latest_universal").write_text(out.name)


def test_a_checkpoint_of_another_world_size_loads_from_its_flushed_universal_conversion(tmp_path, monkeypatch):
    """Saved on 2 ranks, resumed on 1: rank 0 converts it once (a failure left by an earlier try
    is cleared first), the conversion is on storage before its marker names it finished, and
    DeepSpeed loads it with load_universal_checkpoint on; a later resume finds it done."""
    from mto_ds.engine import checkpoint as checkpoint_module
    from mto_ds.models.weights import converted_from
    ckpt = tmp_path / "checkpoints"
    _complete_tags(ckpt, 4, world_size=2)
    (ckpt / "step_00000004_universal.failed").write_text("No space left on device")
    monkeypatch.setattr(checkpoint_module, "convert_to_universal", _fake_ds_to_universal)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    loaded = []
    monkeypatch.setattr(Checkpointer, "_load", staticmethod(lambda engine, source: loaded.append(source) or {"s": 1}))
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    checkpointer = Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)
    tag = ckpt / "step_00000004"
    assert checkpointer.load_newest(engine, checkpointer.candidates("auto")) == (tag, {"s": 1})
    out = ckpt / "step_00000004_universal"
    assert loaded == [out] and engine._config.load_universal_checkpoint is True
    assert converted_from(out, tag) and (ckpt / "latest_universal").read_text() == out.name
    assert str(ckpt / "step_00000004_universal.tmp" / "zero" / "fp32.pt") in synced  # before the rename
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest_universal", "step_00000004", "step_00000004_universal"]
    # Converted before, from this very save: not again.
    monkeypatch.setattr(checkpoint_module, "convert_to_universal", None)
    assert checkpoint_module.to_universal(tag) == out


def test_ranks_waiting_for_a_conversion_stop_waiting_when_rank_0_records_its_failure(tmp_path):
    """The other ranks poll the run directory for rank 0's conversion rather than wait in a
    collective; a failure recorded in step_N_universal.failed ends their wait too."""
    ckpt = tmp_path / "checkpoints"
    _complete_tags(ckpt, 4, world_size=2)
    (ckpt / "step_00000004_universal.failed").write_text("No space left on device")
    waiting = threading.Thread(target=Checkpointer(ckpt, keep_last=2, rank=1, world_size=1)._convert,
                               args=(ckpt / "step_00000004",), daemon=True)
    waiting.start()
    waiting.join(timeout=10)
    assert not waiting.is_alive()


def test_the_optimizer_after_a_load_keeps_the_runs_hyperparameters_and_one_step_count_per_parameter():
    """ZeRO-3's universal loader copies the first group's hyperparameters to every group and
    shares one `step` tensor among the parameters (engine/checkpoint.py:_repair_optimizer)."""
    from mto_ds.engine.checkpoint import _repair_optimizer
    shared = torch.tensor(3.0)
    base = SimpleNamespace(state={0: {"step": shared}, 1: {"step": shared}})
    loaded = SimpleNamespace(param_groups=[{"weight_decay": 0.05, "lr": 1e-3}, {"weight_decay": 0.05, "lr": 1e-3}],
                             optimizer=base)
    _repair_optimizer(loaded, [{"weight_decay": 0.05}, {"weight_decay": 0.0}])
    assert [(g["weight_decay"], g["lr"]) for g in loaded.param_groups] == [(0.05, 1e-3), (0.0, 1e-3)]
    assert base.state[0]["step"] is not base.state[1]["step"]
    base.state[0]["step"] += 1  # what torch's Adam does for each parameter
    assert (base.state[0]["step"].item(), base.state[1]["step"].item()) == (4.0, 3.0)


def test_a_write_that_fails_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """checkpoints/latest, complete.json and state.json are written whole or not at all: a full
    disk mid-write keeps what was there, and no `.tmp` file piles up beside it."""
    from mto_ds.engine.storage import atomic_write
    latest = tmp_path / "latest"
    assert atomic_write(latest, "step_00000003")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    for first_only in (False, True):
        with pytest.raises(OSError, match="No space left"):
            atomic_write(latest if not first_only else tmp_path / "state.json", "step_00000006", first_only)
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("latest", "step_00000003")]


def test_writers_on_two_nodes_with_the_same_pid_use_different_temporary_files(tmp_path, monkeypatch):
    """Ranks on several nodes write state.json at once, and containers give processes the same
    pids: a temporary file named by the pid alone would be written by both."""
    from mto_ds.engine import storage
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(storage.os, "replace", lambda src, dst: (renamed.append(Path(src).name), real_replace(src, dst)))
    for host in ("node1", "node2"):
        monkeypatch.setattr(storage.socket, "gethostname", lambda host=host: host)
        storage.atomic_write(tmp_path / "state.json", host)
    assert len(set(renamed)) == 2 and all(n.startswith("state.json.tmp") for n in renamed)


AGREE_ON_PROBLEMS = r"""
import json, os
import torch
import torch.distributed as dist
from mto_ds.engine.distributed import agree
from mto_ds.engine.step import _all_finite
dist.init_process_group("gloo")
rank = dist.get_rank()
verdicts = [agree(None), agree("KeyError: 'optimizer_state_dict'" if rank == 1 else None),
            agree(f"broken on {rank}"),
            _all_finite(torch.tensor(float("nan") if rank == 1 else 0.5)), _all_finite(torch.tensor(0.5))]
with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump(verdicts, f)
dist.destroy_process_group()
"""


def test_a_problem_on_one_rank_reaches_every_rank_with_its_cause_and_rank(tmp_path):
    """A checkpoint damaged only in rank 1's files: rank 0, which logs the warning, names the
    cause and the rank, not only that it failed somewhere. Likewise a loss that is NaN on rank 1
    only is non-finite on both ranks, so both skip that step (engine/step.py)."""
    rank0, rank1 = _two_gloo_ranks(AGREE_ON_PROBLEMS, tmp_path)
    assert rank0 == [None, "on rank 1: KeyError: 'optimizer_state_dict'", "broken on 0", False, True]
    assert rank1 == [None, "KeyError: 'optimizer_state_dict'", "broken on 1", False, True]


# --- non-finite losses ----------------------------------------------------------------------

def test_nonfinite_losses_skip_their_steps_and_k_in_a_row_stop_the_run(tmp_path):
    """NaN on rank 1 only, at steps 3 and 5-7; at most 3 in a row. Both ranks skip those steps
    (parameters unchanged), step 4 trains, and the run stops at step 7 with exit code 1."""
    run_dir = tmp_path / "run"
    run = Run(run_dir, "checkpoint.every_steps=2", "train.max_nonfinite_steps=3", nproc=2,
              env={"MTO_DS_FAULT_NAN_STEPS": "3,5,6,7", "MTO_DS_FAULT_NAN_RANK": "1"}).finish(expect=1)
    assert "3 optimizer steps in a row had a non-finite loss or gradients (steps 5-7, train.max_nonfinite_steps=3)" in run.output
    assert state(run_dir)["reason"].startswith("non-finite loss: 3 optimizer steps in a row")
    assert (state(run_dir)["finished"], state(run_dir)["step"]) == (False, 7)
    rows = {r["step"]: r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["nonfinite_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 3, 4]
    assert [rows[s]["loss"] is None for s in range(1, 8)] == [False, False, True, False, True, True, True]
    # No checkpoint was written on the way out; those before are complete and loadable.
    assert tags(run_dir) == ["step_00000002", "step_00000004", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    def weights(step):
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")
    w2, w4, w6 = weights(2), weights(4), weights(6)
    assert all(torch.equal(w4[k], w6[k]) for k in w4)  # steps 5 and 6 were skipped
    assert not all(torch.equal(w2[k], w4[k]) for k in w2)  # step 4 trained (step 3 was skipped)
    assert all(torch.isfinite(v).all() for v in w6.values())


def test_fp16_gradients_that_overflow_at_the_minimum_loss_scale_stop_the_run_without_saving(tmp_path):
    """fp16's loss scaler skips a step whose gradients overflow and halves its scale; at its
    minimum (fp16.min_loss_scale) DeepSpeed gives up with a bare Exception. The run stops as at a
    streak of non-finite losses: exit code 1, a message that says what happened and where the newest
    checkpoint is, state.json's reason, nothing saved on the way out, and the skipped steps'
    checkpoints hold the weights of the last applied step. fp16 on this CPU: tests/fp16_on_cpu."""
    ds = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())
    ds["fp16"].update(initial_scale_power=2, hysteresis=1, min_loss_scale=1)  # 4 -> 2 -> 1 -> stop
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    run = Run(run_dir, f"deepspeed.config={tmp_path / 'fp16.json'}", "checkpoint.every_steps=1",
              *HALF_PRECISION_SMALL, steps=6,
              env={"MTO_DS_FAULT_NAN_GRAD_STEPS": "2,3,4,5,6",
                   "PYTHONPATH": str(REPO / "tests" / "fp16_on_cpu")}).finish(expect=1)
    message = ("fp16: the gradients of step 4 overflowed at the minimum loss scale (fp16.min_loss_scale=1) "
               "after 2 steps skipped for overflows; stopping without saving. The checkpoints are untouched; "
               f"the newest is {run_dir / 'checkpoints' / 'step_00000003'}")
    assert f"mto-ds: {message}" in run.output
    assert state(run_dir) == {"finished": False, "step": 3, "total_steps": 6,
                              "reason": f"non-finite gradients: {message}"}
    rows = read_metrics(run_dir)
    assert [(r["step"], r["loss_scale"], r["overflow_steps"]) for r in rows] == [(1, 4.0, 0), (2, 2.0, 1), (3, 1.0, 2)]
    assert tags(run_dir)[-2:] == ["step_00000002", "step_00000003"]

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    w2, w3 = (get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{s:08d}")
              for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) and torch.isfinite(w3[k]).all() for k in w2)  # step 3 was skipped


def test_a_nan_gradient_that_reaches_the_weights_is_never_checkpointed_and_the_run_resumes_before_it(tmp_path):
    """Step 3's loss is finite but rank 1's gradient is NaN. With the bf16 settings of the shipped
    ZeRO-1/2 configs, DeepSpeed neither scans gradients for overflow nor skips on a non-finite
    norm, so the NaN reaches the weights (on CPU here, as on a GPU). The save at step 4 finds
    them non-finite: the run stops (exit 1) without saving, step 2 stays the newest checkpoint,
    and a resume without the fault retrains step 3 with the same loss and finishes finite."""
    ds_config = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    ds_config["bf16"] = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())["bf16"]
    (tmp_path / "cpu_zero2_bf16.json").write_text(json.dumps(ds_config))
    run_dir = tmp_path / "run"
    overrides = ("checkpoint.every_steps=2", f"deepspeed.config={tmp_path / 'cpu_zero2_bf16.json'}",
                 *HALF_PRECISION_SMALL)
    run = Run(run_dir, *overrides, nproc=2,
              env={"MTO_DS_FAULT_NAN_GRAD_STEPS": "3", "MTO_DS_FAULT_NAN_RANK": "1"}).finish(expect=1)
    assert "the weights are not finite at step 4 (a non-finite gradient was applied)" in run.output
    assert f"the newest is {run_dir / 'checkpoints' / 'step_00000002'}" in run.output
    assert state(run_dir)["reason"].startswith("non-finite weights: ")
    failed = losses_by_step(run_dir)
    assert [failed.get(s) is None for s in (1, 2, 3, 4)] == [False, False, False, True]  # 4 ran on NaN weights
    assert tags(run_dir) == ["step_00000002"]

    resumed = Run(run_dir, *overrides, nproc=2).finish()
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in resumed.output
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    final = losses_by_step(run_dir)
    assert final[3] == pytest.approx(failed[3], rel=1e-6)  # same weights (step 2's) and samples
    assert all(final[s] is not None and math.isfinite(final[s]) for s in range(3, STEPS + 1))


def test_nan_gradient_fault_steps_parse_and_follow_the_nan_rank():
    faults = Faults.from_env({"MTO_DS_FAULT_NAN_GRAD_STEPS": "3, 5", "MTO_DS_FAULT_NAN_RANK": "0"})
    assert faults.nan_gradient(3, 0) and faults.nan_gradient(5, 0)
    assert not faults.nan_gradient(3, 1) and not faults.nan_gradient(4, 0) and not faults.nan_loss(3, 0)
    with pytest.raises(ValueError, match="MTO_DS_FAULT_NAN_GRAD_STEPS='x': expected step numbers"):
        Faults.from_env({"MTO_DS_FAULT_NAN_GRAD_STEPS": "x"})


# --- torchrun's elastic agent ---------------------------------------------------------------

def test_torchrun_restarts_a_job_whose_rank_died_and_it_resumes_to_the_exact_step_count(tmp_path, reference):
    """Rank 1 exits hard right after step 5 (once); torchrun (--max-restarts=1, c10d rendezvous)
    restarts both ranks, which resume from step 3 and finish all 12 steps.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default the restarted ranks share the rendezvous
    store with the ranks that died, whose process-group keys are still in it; a restarted rank
    can then read its peer's stale address and fail to connect (seen here as "Gloo
    connectFullMesh failed ... Connection refused"). With it, every start gets a fresh store."""
    run_dir = tmp_path / "run"
    agent = ("--nnodes=1:1", "--max-restarts=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=robustness", "--monitor-interval=0.5")
    run = Run(run_dir, nproc=2, torchrun_args=agent, env={
        "MTO_DS_FAULT_EXIT_AT_STEP": "5", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}).finish()
    assert "fault injection: rank 1 exits hard after step 5" in run.output
    assert (run_dir / "fault_exit_at_step_5.done").is_file()
    assert f"resumed from {run_dir}/checkpoints/step_00000003 at step 3" in run.output
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    # Each step once in metrics.jsonl; the first start's rows after the checkpoint (step 4, and 5
    # unless torchrun stopped rank 0 first) are set aside, and re-ran with the same losses.
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    first_start = {json.loads(line)["step"]: json.loads(line)["loss"]
                   for line in (run_dir / "metrics.jsonl.superseded").read_text().splitlines()}
    assert sorted(first_start) in ([4], [4, 5])
    final = losses_by_step(run_dir)
    assert [first_start[s] for s in sorted(first_start)] == pytest.approx([final[s] for s in sorted(first_start)], rel=1e-5)
    assert final == pytest.approx(losses_by_step(reference), rel=1e-5)


def test_a_rank_that_fails_alone_is_named_with_its_error_in_state_json_and_by_torchrun(tmp_path):
    """A Python error on rank 1 alone (as a CUDA out-of-memory on one GPU is): rank 0 fails after
    it only of its absence. state.json keeps rank 1's reason, not rank 0's closed connection nor
    an earlier start's "finished", and torchrun's summary shows rank 1's traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"finished": True, "step": 4, "total_steps": 4,
                                                    "reason": "completed"}))
    run = Run(run_dir, nproc=2, steps=4, env={"MTO_DS_FAULT_RAISE_AT_STEP": "2"})
    assert run.wait() != 0
    assert state(run_dir) == {"finished": False, "step": 2, "total_steps": 4, "reason":
                              "error: rank 1 of 2: InjectedFault: fault injection: rank 1 fails after step 2"}
    # torchrun's summary of the failed ranks: rank 1 with its traceback. (Which one it calls the
    # root cause is its pick: error files carry whole seconds, and rank 0 fails within the same.)
    summary = run.output.split("Failures:", 1)[1]
    assert "rank      : 1 (local_rank: 1)" in summary
    assert "mto_ds.engine.faults.InjectedFault: fault injection: rank 1 fails after step 2" in summary


def test_a_start_killed_before_it_writes_state_json_leaves_none_of_an_earlier_start(tmp_path):
    """An earlier start's state.json must not speak for this one: killed hard (os._exit, as by
    kill -9 or a lost node), this start leaves no state.json, not the earlier "finished"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"finished": True, "step": 2, "total_steps": 2,
                                                    "reason": "completed"}))
    Run(run_dir, steps=3, env={"MTO_DS_FAULT_EXIT_AT_STEP": "1", "MTO_DS_FAULT_EXIT_RANK": "0"}).finish(expect=17)
    assert not (run_dir / "state.json").exists()


# --- batch geometry and DeepSpeed settings ---------------------------------------------------

@pytest.mark.parametrize("world, micro, expected", [
    (2, 16, (16, 1)), (1, 16, (16, 2)), (4, 16, (8, 1)), (1, None, (32, 1)), (8, 2, (2, 2))])
def test_global_batch_stays_the_users_and_accumulation_follows_the_world_size(world, micro, expected):
    plan = plan_batch(32, micro, world)
    assert (plan.micro_batch_size, plan.accumulation) == expected
    assert plan.places == 32 == plan.global_batch_size
    assert plan.samples_per_micro_batch == plan.micro_batch_size  # whole micro-batches: weight 1


@pytest.mark.parametrize("global_batch, micro, world, expected", [
    (32, 16, 3, (11, 1)),      # shares 10, 11, 11: one micro-batch of at most 11
    (4096, 32, 48, (29, 3)),   # 6 nodes x 8 GPUs: shares 85 and 86, in 3 micro-batches of at most 29
    (48, 10, 2, (8, 3)),       # micro-batches of at most 10 that split 24 evenly
    (2048, 128, 40, (52, 1))])
def test_a_global_batch_the_ranks_do_not_divide_is_kept_in_shares_that_differ_by_a_sample(
        global_batch, micro, world, expected):
    """Coming back after a preemption on 6 nodes of 8 GPUs, a run of global batch 4096 stopped
    with a config error: the global batch had to divide over the ranks, and changing it moves the
    data position by whole epochs and changes the LR. Now the ranks take shares that differ by one
    sample and the micro-batch is the most a rank runs at once."""
    plan = plan_batch(global_batch, micro, world)
    assert (plan.micro_batch_size, plan.accumulation) == expected
    assert plan.global_batch_size == global_batch and plan.micro_batch_size <= micro
    assert plan.places >= global_batch > plan.places - plan.accumulation * world
    assert plan.samples_per_micro_batch == pytest.approx(global_batch / (plan.accumulation * world))
    assert "(the ranks do not divide it)" in describe_batch(plan, micro) or global_batch % world == 0


def test_more_ranks_than_samples_in_a_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="train.global_batch_size=4 is smaller than the 8 data-parallel ranks"):
        plan_batch(4, 1, 8)
    assert (plan_batch(4, 1, 4).micro_batch_size, plan_batch(4, 1, 4).accumulation) == (1, 1)  # one each is enough


def test_the_start_log_says_how_the_global_batch_splits_and_when_the_micro_batch_asked_does_not_split_a_share():
    assert describe_batch(plan_batch(32, None, 1), None) == (
        "global batch 32 = 1 rank x 32 samples, in 1 micro-batch(es) of at most 32")
    assert describe_batch(plan_batch(32, 16, 1), 16) == (
        "global batch 32 = 1 rank x 32 samples, in 2 micro-batch(es) of at most 16")
    assert describe_batch(plan_batch(48, 10, 2), 10) == (
        "global batch 48 = 2 ranks x 24 samples, in 3 micro-batch(es) of at most 8 "
        "(train.micro_batch_size=10 does not split 24 evenly)")
    assert describe_batch(plan_batch(32, 16, 3), 16) == (
        "global batch 32 = 3 ranks x 10-11 samples (the ranks do not divide it), in 1 micro-batch(es) of at most 11")


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_activation_checkpointing_recomputes_every_kth_block_and_leaves_gradients_unchanged(method):
    """train.activation_checkpointing with train.checkpoint_every=k: blocks 0, k, 2k, ... of each
    stack (SimMIM's encoder; MAE's encoder, whose blocks see no mask token, and its decoder) run
    again in the backward pass, the others once; the gradients are those of no checkpointing."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::4] = True  # MAE: every sample masks the same number
    small = {"decoder_embed_dim": 32, "decoder_depth": 3, "decoder_num_heads": 2} if method == "mae" else {}
    grads, calls = {}, {}
    for every in (None, 1, 2, 5):
        torch.manual_seed(0)
        model = create_mim_model("vit_tiny_patch16", method, img_size=64, mto={"enabled": True},
                                 activation_checkpointing=every is not None, checkpoint_every=every or 1, **small)
        stacks = [model.encoder.blocks] + ([model.decoder_blocks] if method == "mae" else [])
        counts = [[0] * len(stack) for stack in stacks]
        for stack, count in zip(stacks, counts):
            for index, block in enumerate(stack):
                block.register_forward_pre_hook(lambda *_, count=count, index=index: count.__setitem__(
                    index, count[index] + 1))
        model(images, mask)["loss"].backward()
        grads[every] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        calls[every] = counts
    assert calls[None] == [[1] * len(stack) for stack in calls[None]]
    for every in (1, 2, 5):
        assert calls[every] == [[2 if index % every == 0 else 1 for index in range(len(stack))]
                                for stack in calls[None]], every
    assert [len(stack) for stack in calls[None]] == ([12] if method == "simmim" else [12, 3])
    for every in (1, 2, 5):
        assert grads[every].keys() == grads[None].keys()
        for name in grads[None]:
            torch.testing.assert_close(grads[every][name], grads[None][name], rtol=1e-5, atol=1e-7, msg=name)


def test_fault_variables_are_parsed_and_rejected_when_malformed():
    faults = Faults.from_env({"MTO_DS_FAULT_NAN_STEPS": "3, 4", "MTO_DS_FAULT_NAN_RANK": "1",
                              "MTO_DS_FAULT_EXIT_AT_STEP": "5", "MTO_DS_FAULT_SAVE_STALL": "6:2.5"})
    assert faults.nan_loss(3, 1) and faults.nan_loss(4, 1) and not faults.nan_loss(3, 0)
    assert not faults.nan_loss(5, 1)
    assert (faults.exit_at_step, faults.exit_rank, faults.save_stall_step, faults.save_stall_seconds) == (5, 1, 6, 2.5)
    assert Faults.from_env({}) == Faults()
    with pytest.raises(ValueError, match="MTO_DS_FAULT_NAN_STEPS"):
        Faults.from_env({"MTO_DS_FAULT_NAN_STEPS": "three"})
    with pytest.raises(ValueError, match="MTO_DS_FAULT_EXIT_AT_STEP='five': expected an integer"):
        Faults.from_env({"MTO_DS_FAULT_EXIT_AT_STEP": "five"})
    # Without MTO_DS_FAULT_NAN_RANK, every rank's loss (or gradient) is poisoned.
    everywhere = Faults.from_env({"MTO_DS_FAULT_NAN_STEPS": "3", "MTO_DS_FAULT_NAN_GRAD_STEPS": "4"})
    assert all(everywhere.nan_loss(3, rank) and everywhere.nan_gradient(4, rank) for rank in (0, 1, 5))
    assert not everywhere.nan_gradient(3, 0) and not everywhere.nan_loss(4, 0)
    for stall in ("x", "6:soon"):
        with pytest.raises(ValueError, match="MTO_DS_FAULT_SAVE_STALL"):
            Faults.from_env({"MTO_DS_FAULT_SAVE_STALL": stall})
    data = Faults.from_env({"MTO_DS_FAULT_DATA_STALL": "0.5:1"})
    assert (data.data_stall_seconds, data.data_stall_rank) == (0.5, 1)
    assert Faults.from_env({"MTO_DS_FAULT_DATA_STALL": "2"}).data_stall_rank is None  # every rank
    for stall in ("slow", "1:one"):
        with pytest.raises(ValueError, match=f"MTO_DS_FAULT_DATA_STALL='{stall}': expected SECONDS or SECONDS:RANK"):
            Faults.from_env({"MTO_DS_FAULT_DATA_STALL": stall})


def test_fault_hooks_act_only_at_their_step_and_rank(tmp_path, monkeypatch, caplog):
    """The robustness tests' faults say where they act: MTO_DS_FAULT_RAISE_AT_STEP fails one rank
    (MTO_DS_FAULT_EXIT_RANK) after that step, not every rank nor later steps; a save stalls at
    its step only; MTO_DS_TRACE_SAMPLES=0 is off."""
    import logging
    from mto_ds.engine.faults import InjectedFault, SampleTrace
    faults = Faults.from_env({"MTO_DS_FAULT_RAISE_AT_STEP": "4", "MTO_DS_FAULT_EXIT_RANK": "0",
                              "MTO_DS_FAULT_SAVE_STALL": "6:0.01"})
    for step, rank in ((4, 1), (5, 0), (3, 0)):
        faults.exit_after(step, rank, tmp_path)  # returns
    with pytest.raises(InjectedFault, match="fault injection: rank 0 fails after step 4"):
        faults.exit_after(4, 0, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mto_ds"):
        for step in (5, 6, 7, 12):
            faults.stall_in_save(step, f"step_{step}")
    assert [r.getMessage() for r in caplog.records] == ["fault injection: stalling 0 s inside the save of step_6"]
    for value, on in (("0", False), ("", False), ("1", True)):
        monkeypatch.setenv("MTO_DS_TRACE_SAMPLES", value)
        assert (SampleTrace(tmp_path / value, rank=0, world_size=1).path is not None) == on, value


def test_checkpoint_of_another_zero_stage_is_a_config_error_not_damage(tmp_path):
    """DeepSpeed cannot load a ZeRO-2 checkpoint into ZeRO-3 (not even through the universal
    format): resuming with another stage must say so, not call every checkpoint damaged."""
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / MARKER).write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 2, "files": {}}))
    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, rank=0, world_size=2, zero_stage=3)
    with pytest.raises(ConfigError, match="saved with ZeRO-2, this run uses ZeRO-3"):
        checkpointer.load_newest(engine=None, candidates=[tag])
    assert tags(tmp_path) == ["step_00000004"]  # nothing set aside


def test_a_metrics_line_cut_short_by_a_crash_is_set_aside_and_does_not_stop_the_resume(tmp_path):
    """A node that dies mid-write leaves half a row (no newline) at the end of metrics.jsonl:
    the resume moves it to metrics.jsonl.superseded with the rows after the resume point, and the
    file the run appends to holds only whole rows; TensorBoard hides the same steps' events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mto_ds.engine.telemetry import Telemetry
    path = tmp_path / "metrics.jsonl"
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=0, progress_bar=False)
    for step in range(1, 8):
        telemetry.log({"step": step, "loss": 1.0 / step})
    telemetry.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "epoch": 1.0, "lo')
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=4, progress_bar=False)
    telemetry.log({"step": 5, "loss": 50.0})
    telemetry.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    superseded = (tmp_path / "metrics.jsonl.superseded").read_text().splitlines()
    assert superseded[:3] == [json.dumps({"step": s, "loss": 1.0 / s}) for s in (5, 6, 7)]
    assert superseded[3] == '{"step": 8, "epoch": 1.0, "lo'
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25), (5, 50.0)]


def test_log_lines_while_the_progress_bar_shows_are_lines_of_their_own(tmp_path, monkeypatch):
    """With the bar on (the demo, a terminal), rank 0's log lines were written into the bar's own
    line ("... loss=0.5000][12:01 rank0] INFO ..."). Each is now a line of its own, the bar
    drawn again below it, and once the bar is closed the console handler is the one it was."""
    import io
    from mto_ds.engine.telemetry import Telemetry
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = logging.StreamHandler(terminal)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=0, progress_bar=True)
    telemetry.tick(3)
    telemetry.log({"step": 3, "loss": 0.5})
    logging.getLogger("mto_ds").warning("saved step 3")
    telemetry.tick(4)
    telemetry.close()
    logging.getLogger("mto_ds").warning("after the bar")
    # What a terminal shows of each line: the text after its last carriage return.
    shown = [line.rsplit("\r", 1)[-1] for line in terminal.getvalue().split("\n")]
    assert "LOG saved step 3" in shown
    assert shown[shown.index("LOG saved step 3") + 1].startswith(" 40%|")
    assert shown[-2:] == ["LOG after the bar", ""]
    assert logging.getLogger().handlers == [console]


def test_metrics_rows_after_the_resume_point_are_set_aside_not_duplicated(tmp_path):
    import json as _json
    from mto_ds.engine.telemetry import Telemetry
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=4, progress_bar=False)
    telemetry.close()
    assert [_json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
    superseded = (tmp_path / "metrics.jsonl.superseded").read_text().splitlines()
    assert [_json.loads(l)["step"] for l in superseded] == [5, 6, 7]

    # Started afresh (no checkpoint to resume), even step 0's evaluation of the initial encoder
    # (eval.at_start) is of an earlier start: set aside, so this start evaluates its own.
    path.write_text(_json.dumps({"step": 0, "epoch": 0.0, "knn_top1": 10.0}) + "\n")
    Telemetry(tmp_path, enabled=True, total_steps=10, start_step=0, progress_bar=False, resumed=False).close()
    assert path.read_text() == ""
    assert _json.loads((tmp_path / "metrics.jsonl.superseded").read_text().splitlines()[-1])["knn_top1"] == 10.0


def test_a_metrics_row_and_its_tensorboard_scalars_name_each_value_where_users_look_for_it(tmp_path):
    """metrics.jsonl: a value that is not finite is null (JSON has no NaN), in per-block lists too.
    TensorBoard: train/<key>, eval/<key> for accuracies (a key with its own section kept as is),
    mto/<key>/block_NN per block, and no flag (a bool) or null plotted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mto_ds.engine.telemetry import Telemetry
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=0, progress_bar=False)
    telemetry.log({"step": 1, "loss": 0.5, "loss_scale": float("inf"), "knn_top1": 50.0, "eval/linear_top1": 40.0,
                   "entropy_masked": [0.5] * 10 + [float("nan")], "grad_norm": None, "skipped": True})
    telemetry.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert row["loss_scale"] is None and row["entropy_masked"] == [0.5] * 10 + [None]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(["eval/knn_top1", "eval/linear_top1", "train/loss"] + [
        f"mto/entropy_masked/block_{b:02d}" for b in range(10)])
    assert telemetry.summary(tmp_path, 1.0, tmp_path / "ckpt", 1, 1, "completed").splitlines()[-2] == (
        f"  checkpoint      {tmp_path / 'ckpt'}")
    # Ranks other than 0 log nothing and write nothing.
    quiet = Telemetry(tmp_path / "rank1", enabled=False, total_steps=10, start_step=0, progress_bar=True)
    quiet.log({"step": 1, "loss": 0.5})
    quiet.close()
    assert not (tmp_path / "rank1").exists()


def test_the_progress_bar_of_a_resumed_run_counts_from_its_start_step(tmp_path):
    from mto_ds.engine.telemetry import Telemetry
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=10, start_step=3, progress_bar=True)
    assert telemetry.bar.n == 3
    telemetry.tick(5)
    assert telemetry.bar.n == 5
    telemetry.close()


def test_rows_set_aside_by_two_resumes_are_all_kept_and_blank_lines_are_no_rows(tmp_path):
    """metrics.jsonl.superseded gathers what every resume set aside, in order; an empty line is
    not a damaged row (no warning), and evaluation_logged finds an evaluation row by its step."""
    from mto_ds.engine.telemetry import Telemetry, evaluation_logged, set_aside_rows_after
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    Telemetry(tmp_path, enabled=True, total_steps=10, start_step=5, progress_bar=False).close()
    Telemetry(tmp_path, enabled=True, total_steps=10, start_step=3, progress_bar=False).close()
    superseded = (tmp_path / "metrics.jsonl.superseded").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded] == [6, 7, 4, 5]
    path.write_text('{"step": 1}\n\n{"step": 5}\n')
    assert set_aside_rows_after(path, 2) == 0
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "knn_top1": 10.0}\n')
    assert evaluation_logged(path, 4) and not evaluation_logged(path, 2) and not evaluation_logged(path, 3)
    assert not evaluation_logged(tmp_path / "missing.jsonl", 4)


AGREE = r"""
import json, os, signal
import torch.distributed as dist
from mto_ds.engine.signals import StopRequest
dist.init_process_group("gloo")
stop, seen, codes, asked = StopRequest(), [], [], []
for step in range(1, 7):
    if step == int(os.environ["SIGNAL_STEP"]) and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # rank 1 only, during that step
    if step == 4 and dist.get_rank() == 0:
        stop.taken_over = True  # rank 0's run directory lock was lost during step 4
    # A timed save asked by rank 1's clock alone at step 3, by rank 0's alone at step 5.
    seen.append(stop.agreed(save_asked_at=step if (step, dist.get_rank()) in ((3, 1), (5, 0)) else 0))
    codes.append(stop.agreed_code)
    asked.append(stop.agreed_save_asked_at)
stop.close()  # as the trainer does: no reduction left in flight at exit
with open(os.path.join(os.environ["OUT_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"seen": seen, "codes": codes, "asked": asked, "signal": stop.signal_name}, f)
dist.destroy_process_group()  # as mto-ds does (shutdown_distributed)
"""


def _two_gloo_ranks(script: str, tmp_path, **env) -> list:
    """Run `script` as 2 ranks under torchrun; each writes OUT_DIR/rank<R>.json: return both."""
    path = tmp_path / "ranks.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(path)], cwd=REPO,
                            env=cpu_env(OUT_DIR=str(tmp_path), **env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("signal_step", [2, 1])
def test_stop_agreement_reaches_every_rank_one_step_after_the_signal(tmp_path, signal_step):
    """The per-step all-reduce is read at the next step (no GPU drain), so the ranks agree on a
    signal that one rank got during step 2 at step 3, all at the same step, naming it; one during
    step 1 (before any agreement was in flight) at step 2, not by that rank alone at step 1. A run
    directory taken over on rank 0 (stop without saving) is agreed the same way, over the signal.
    A timed save (checkpoint.every_minutes) that one rank's clock asks for at step s rides the same
    reduction: every rank reads step s at step s + 1, so all save after the same step."""
    import signal
    from mto_ds.engine.signals import TAKEN_OVER
    usr1 = int(signal.SIGUSR1)
    seen = [step > signal_step for step in range(1, 7)]
    codes = [usr1 if step > signal_step else 0 for step in range(1, 5)] + [TAKEN_OVER, TAKEN_OVER]
    asked = [0, 0, 0, 3, 0, 5]
    for rank, row in enumerate(_two_gloo_ranks(AGREE, tmp_path, SIGNAL_STEP=str(signal_step))):
        assert row == {"seen": seen, "codes": codes, "asked": asked, "signal": "SIGUSR1"}, (rank, row)


# --- a stop signal before training starts -----------------------------------------------------

def _catches(pid: int, sig) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the SigCgt mask of /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (int(sig) - 1) & 1)


def test_a_stop_signal_while_the_rank_is_still_importing_ends_in_a_clean_stop(tmp_path):
    """SIGUSR1 the moment the rank can take it, while torch and DeepSpeed are still importing
    (seconds in which a scheduler may well signal it): the rank must neither die of it (the
    default action) nor lose it. It sets up, trains one step, saves and exits 0 naming it."""
    import signal
    run_dir = tmp_path / "run"
    run = Run(run_dir)
    run.wait_for(lambda: _catches(run.proc.pid, signal.SIGUSR1), "a SIGUSR1 handler", timeout=60)
    assert not (run_dir / "config.yaml").exists()  # still starting up: the run directory comes later
    run.signal_ranks(signal.SIGUSR1)
    run.finish()
    assert state(run_dir) == {"finished": False, "step": 1, "total_steps": STEPS, "reason": "signal SIGUSR1"}
    assert tags(run_dir) == ["step_00000001"] and _complete(run_dir, "step_00000001")


def test_pretrain_takes_stop_signals_before_loading_the_config_or_importing_torch(monkeypatch):
    import signal
    from mto_ds import cli
    from mto_ds.engine.signals import StopRequest
    seen = {}

    def first_slow_import():  # cli imports torch here, after the config is loaded
        seen["handlers"] = [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)]
        raise SystemExit(0)
    monkeypatch.setattr(cli, "_setup_environment", first_slow_import)
    monkeypatch.setattr("mto_ds.config.load_config", lambda *a, **kw: seen.setdefault(
        "at_config", [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)]))
    previous = [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)]
    try:
        with pytest.raises(SystemExit):
            cli.main(["pretrain", "--config", "configs/demo.yaml"])
    finally:
        for sig, handler in zip((signal.SIGUSR1, signal.SIGTERM), previous):
            signal.signal(sig, handler)
    for handlers in (seen["at_config"], seen["handlers"]):
        assert [type(getattr(h, "__self__", None)) for h in handlers] == [StopRequest, StopRequest]


def test_the_universal_conversion_lives_on_through_stop_signals(tmp_path):
    """ds_to_universal ran with the default dispositions: a SIGUSR1/SIGTERM during set-up (Slurm
    signals every process of the step; a Ctrl-C reaches the whole process group) killed it, and
    set-up failed with 'converting ... failed' after minutes of conversion, where the rank itself
    only notes the stop for after its first step. The child now ignores them before it imports
    anything, and gets its module's arguments as `python -m` would give them."""
    from mto_ds.engine.checkpoint import run_module_ignoring_stop_signals
    (tmp_path / "probe_module.py").write_text(
        "import os, signal, sys\n"
        "print([signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)])\n"
        "print(sys.argv[1:])\n"
        "for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):\n"
        "    os.kill(os.getpid(), s)\n"
        "print('alive')\n")
    result = run_module_ignoring_stop_signals("probe_module", ["--input_folder", "a b", "-x"],
                                              env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[True, True, True]", "['--input_folder', 'a b', '-x']", "alive"]


SHARED_DIR = r"""
import json, os
from pathlib import Path
import torch, torch.distributed as dist
from mto_ds.engine.distributed import check_shared_directory
dist.init_process_group("gloo")
rank, base = dist.get_rank(), Path(os.environ["OUT_DIR"])
verdicts = {}
for case, directory in (("shared", base / "run"), ("node_local", base / f"node{rank}" / "run")):
    directory.mkdir(parents=True, exist_ok=True)
    verdicts[case] = check_shared_directory(directory, rank, 2, torch.device("cpu"))
    verdicts[case + "_left"] = sorted(p.name for p in directory.iterdir())
(base / f"rank{rank}.json").write_text(json.dumps(verdicts))
dist.destroy_process_group()
"""


def test_a_run_directory_that_not_every_rank_sees_is_found_before_training(tmp_path):
    """Ranks agree on which checkpoints exist from the run directory: one on a node-local disk
    (here: rank 1 looks in another folder) must stop the run at start, on every rank."""
    rank0, rank1 = _two_gloo_ranks(SHARED_DIR, tmp_path)
    assert rank0["shared"] is None and rank1["shared"] is None
    assert rank0["shared_left"] == rank1["shared_left"] == []  # the probe is removed again
    assert "rank 1 on" in rank1["node_local"] and "does not see" in rank1["node_local"]
    assert rank0["node_local"] == f"on rank 1: {rank1['node_local']}"  # rank 0's log says why


def test_a_final_evaluation_cut_short_is_done_by_the_next_start_and_only_then_is_the_run_finished(tmp_path):
    """The checkpoint of an epoch's last step is saved before that epoch's evaluation, also where
    checkpoint.every_steps does not fall on it (0 here: only at the end; every step since the
    last save was lost and trained again). When the evaluation fails (here: its images cannot be
    decoded; in practice also a kill or a stop signal), the run must not say finished, and the
    next start evaluates it first, from that checkpoint (the study's point for that epoch was
    lost for good before), then trains on. A third start adds nothing."""
    from mto_ds.engine.telemetry import evaluation_logged
    run = tmp_path / "run"
    small = ("data.synthetic_images=64", "train.epochs=2", "checkpoint.every_steps=0", "eval.every_epochs=1",
             "eval.num_train=32", "eval.num_val=16", "eval.linear_epochs=2", "run.log_every=1",
             "run.progress_bar=false")
    cmd = [sys.executable, "-m", "mto_ds", "pretrain", "--config", "configs/demo.yaml", f"run.output_dir={run}", *small]
    for split in ("train", "val"):  # listed, so set-up accepts them; undecodable, so the evaluation fails
        (tmp_path / "no_eval_images" / split / "cat").mkdir(parents=True)
        (tmp_path / "no_eval_images" / split / "cat" / "0.JPEG").write_bytes(b"not a JPEG")
    broken = subprocess.run([*cmd, f"eval.path={tmp_path / 'no_eval_images'}"], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1 and "none of the 1 images of the evaluation set could be decoded" in broken.stderr
    assert state(run)["finished"] is False and state(run)["step"] == 2
    assert _complete(run, "step_00000002") and not evaluation_logged(run / "metrics.jsonl", 2)
    for _ in range(2):
        again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert state(run) == {"finished": True, "step": 4, "total_steps": 4, "reason": "completed"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [2, 4]  # each evaluated once, by the second start
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_start_with_other_settings_keeps_the_earlier_config_and_names_what_changed(tmp_path, caplog):
    """config.yaml was rewritten by every start: a finished run started again with another
    learning rate (nothing left to train) then described settings its numbers never had."""
    import logging
    from mto_ds.config import load_config, to_yaml
    from mto_ds.engine.run_dir import write_config
    first = to_yaml(load_config(REPO / "configs" / "demo.yaml"))
    write_config(tmp_path, first)
    write_config(tmp_path, first)  # the same settings: nothing kept, nothing said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    with caplog.at_level(logging.WARNING, logger="mto_ds"):
        write_config(tmp_path, to_yaml(load_config(REPO / "configs" / "demo.yaml", ["train.blr=0.5", "eval.num_val=16"])))
    (kept,) = [p for p in tmp_path.iterdir() if p.name != "config.yaml"]
    assert kept.name.startswith("config.") and kept.read_text() == first
    assert load_config(tmp_path / "config.yaml").train.blr == 0.5
    (message,) = [r.getMessage() for r in caplog.records]
    assert "eval.num_val: 512 -> 16, train.blr: 0.001 -> 0.5" in message and kept.name in message


def test_an_unreadable_earlier_config_is_kept_aside_and_the_start_goes_on(tmp_path, caplog):
    """A config.yaml edited by hand into bad YAML (or cut short: it was not written atomically)
    failed the next start after its set-up with a YAML traceback, leaving running.json, no
    state.json and the telemetry unclosed. It is kept as config.<time>.yaml, with a warning."""
    import logging
    from mto_ds.config import load_config, to_yaml
    from mto_ds.engine.run_dir import write_config
    text = to_yaml(load_config(REPO / "configs" / "demo.yaml"))
    # Bad YAML, and YAML that is no mapping of keys (a list where the sections belong).
    for name, earlier, why in (("cut", "train: {blr: 0.5, epochs: [", "while parsing"),
                               ("list", "- train\n- model\n", "a list, not a mapping")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(earlier)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mto_ds"):
            write_config(run_dir, text)
        assert (run_dir / "config.yaml").read_text() == text
        (kept,) = [p for p in run_dir.iterdir() if p.name != "config.yaml"]
        assert kept.read_text() == earlier
        (message,) = [r.getMessage() for r in caplog.records]
        assert f"the earlier file is not a readable config: {why}" in message and kept.name in message, message


def test_earlier_configs_kept_in_the_same_second_are_all_kept(tmp_path):
    """config.<time>.yaml is named by the second the earlier file was written: a third start with
    other settings in that second kept its predecessor under the same name, over the first one."""
    from mto_ds.config import load_config, to_yaml
    from mto_ds.engine.run_dir import write_config
    texts = [to_yaml(load_config(REPO / "configs" / "demo.yaml", [f"train.blr={blr}"])) for blr in (0.1, 0.2, 0.3)]
    for text in texts:
        write_config(tmp_path, text)
        os.utime(tmp_path / "config.yaml", (1_700_000_000, 1_700_000_000))  # every one in the same second
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == sorted(texts)


def test_a_logged_step_with_a_nonfinite_loss_leaves_the_progress_bar_and_summary_working(tmp_path):
    """A skipped step's row has loss null (ROBUSTNESS.md: non-finite losses). With the progress bar
    on (the default), formatting that null stopped the run with a TypeError at the first such
    logged step; the closing summary reads the first and last rows that have a loss."""
    from mto_ds.engine.telemetry import Telemetry
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=4, start_step=0, progress_bar=True)
    for step, loss in [(1, float("nan")), (2, 0.75), (3, 0.5), (4, float("nan"))]:
        telemetry.log({"step": step, "loss": loss, "images_per_sec": 10.0})
        telemetry.tick(step)
    telemetry.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        None, 0.75, 0.5, None]
    summary = telemetry.summary(tmp_path, 10.0, None, 4, 4, "completed")
    assert "0.7500 (step 2) -> 0.5000 (step 3)" in summary


def test_the_progress_bar_into_a_file_refreshes_once_a_minute(tmp_path, monkeypatch):
    """tqdm redraws every 0.1 s; into a Slurm log each redraw is kept (a line of `\r` updates
    that grows tens of MB over a long run). On a terminal it stays as it was."""
    import io
    from mto_ds.engine.telemetry import Telemetry
    for tty, interval in ((False, 60.0), (True, 0.1)):
        stream = io.StringIO()
        stream.isatty = lambda: tty
        monkeypatch.setattr(sys, "stderr", stream)
        telemetry = Telemetry(tmp_path / str(tty), enabled=True, total_steps=8, start_step=0, progress_bar=True)
        assert telemetry.bar.mininterval == interval
        telemetry.close()


def test_the_closing_summary_gives_the_data_wait_and_the_peak_memory_of_the_rows(tmp_path):
    """A GPU run's summary says whether the loader kept up (the median row's data_wait: an
    epoch's first row, which starts the loader, can outweigh the rest of a short run) and how
    close to the device's memory it came; a CPU run's rows have no memory, nor has its summary."""
    from mto_ds.engine.telemetry import Telemetry
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=12, start_step=0, progress_bar=False)
    for step, wait, allocated, reserved in [(3, 0.8, 20.5, 22.0), (6, 0.02, 25.25, 26.0), (9, 0.01, 25.0, 27.5),
                                            (12, 0.03, None, None)]:
        telemetry.log({"step": step, "loss": 0.5, "images_per_sec": 10.0, "data_wait": wait,
                       "max_memory_allocated_gib": allocated, "max_memory_reserved_gib": reserved})
    telemetry.close()
    lines = telemetry.summary(tmp_path, 10.0, None, 12, 12, "completed", save_seconds=[2.0, 3.0, 30.0],
                              seconds=700.0).splitlines()
    assert "  data wait       2.5% of the time (median of the rows; 80.0% at most, step 3)" in lines
    # What the saves took: to set checkpoint.every_minutes by (the median and their share of the start).
    assert "  saves           3, 3.0 s each (median), 5.0% of this start's time" in lines
    assert "  memory          25.2 GiB in tensors, 27.5 GiB reserved at most (the largest rank's)" in lines
    cpu = Telemetry(tmp_path / "cpu", enabled=True, total_steps=1, start_step=0, progress_bar=False)
    cpu.log({"step": 1, "loss": 0.5, "images_per_sec": 10.0, "data_wait": 0.0,
             "max_memory_allocated_gib": None, "max_memory_reserved_gib": None})
    cpu.close()
    assert not [line for line in cpu.summary(tmp_path, 10.0, None, 1, 1, "completed").splitlines()
                if line.strip().startswith(("memory", "saves"))]  # and a start that saved nothing says nothing


def test_the_closing_summary_says_how_the_start_ended_and_how_to_go_on(tmp_path):
    """After a stop signal it used to say 'pre-training finished' while state.json said not; a
    start of a finished run printed only 'No steps logged'."""
    from mto_ds.engine.telemetry import Telemetry
    telemetry = Telemetry(tmp_path, enabled=True, total_steps=8, start_step=2, progress_bar=False)
    telemetry.log({"step": 3, "loss": 0.5, "images_per_sec": 10.0})
    telemetry.close()
    stopped = telemetry.summary(tmp_path, 10.0, None, 3, 8, "signal SIGTERM").splitlines()
    assert stopped[1] == "mto_ds pre-training stopped at step 3 of 8 (signal SIGTERM); the same command resumes it"
    assert stopped[2].split() == ["loss", "0.5000", "(step", "3)"]  # one row: no "a -> a"
    idle = Telemetry(tmp_path / "again", enabled=True, total_steps=8, start_step=8, progress_bar=False)
    idle.close()
    assert idle.summary(tmp_path, 0.0, None, 8, 8, "completed") == (
        f"mto_ds pre-training finished: step 8 of 8: nothing left to train. Run directory: {tmp_path}")


def test_pruning_a_universal_conversion_removes_the_latest_universal_pointer_that_names_it(tmp_path):
    # ROBUSTNESS.md: `latest_universal` names the newest universal conversion. A run resumed
    # from another world size's checkpoint kept the pointer after pruning deleted its folder.
    ckpt = tmp_path / "checkpoints"
    for step in (2, 3, 4):
        (ckpt / f"step_{step:08d}").mkdir(parents=True)
        (ckpt / f"step_{step:08d}" / MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
    (ckpt / "step_00000002_universal").mkdir()
    (ckpt / "latest_universal").write_text("step_00000002_universal")
    Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)._prune()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000003", "step_00000004"]

    (ckpt / "step_00000004_universal").mkdir()
    (ckpt / "latest_universal").write_text("step_00000004_universal")
    Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)._prune()
    assert (ckpt / "latest_universal").read_text() == "step_00000004_universal"


# --- Ctrl-C ----------------------------------------------------------------------------------

def test_timed_saves_and_kept_epochs_save_together_on_every_rank(tmp_path):
    """checkpoint.every_minutes: a save is due by a rank's clock (here at once: 6 ms); on 2 ranks
    its request is agreed one step later, so all ranks save after the same step, and a request
    sent before a save is not honoured again after it: saves at every second step, none lost to a
    hang. checkpoint.keep_every_epochs=2 saves and keeps the end of epoch 2 (step 6, 3 steps per
    epoch), marked in its complete.json, the others not."""
    from mto_ds.models.weights import read_marker
    run_dir = tmp_path / "run"
    run = Run(run_dir, "data.synthetic_images=96", "checkpoint.every_steps=0", "checkpoint.keep_last=10",
              "checkpoint.every_minutes=0.0001", "checkpoint.keep_every_epochs=2", nproc=2, steps=8).finish()
    assert tags(run_dir) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    # Each save's time is logged and summed up at the end: what every_minutes costs.
    assert run.output.count(f"saved {run_dir}/checkpoints/step_0000000") == 4
    assert "  saves           4, " in run.output
    assert {tag: read_marker(run_dir / "checkpoints" / tag).get("kept") for tag in tags(run_dir)} == {
        "step_00000002": None, "step_00000004": None, "step_00000006": True, "step_00000008": None}
    assert state(run_dir)["finished"] is True


def test_a_first_ctrl_c_saves_like_sigterm_and_the_same_command_resumes_there(tmp_path):
    """A terminal sends SIGINT to its whole process group (the rank and its loader worker). It
    used to end the run with a KeyboardInterrupt traceback and lose the steps since the last
    periodic checkpoint, while the epoch study told the user that the trainer had checkpointed."""
    import signal
    run_dir = tmp_path / "run"
    run = Run(run_dir, "data.num_workers=1", "checkpoint.every_steps=100")
    run.wait_for_step(2)
    run.signal_all_processes(signal.SIGINT)
    run.finish(expect=0)
    stop = state(run_dir)["step"]
    assert state(run_dir)["reason"] == "signal SIGINT" and 2 <= stop < STEPS
    assert tags(run_dir) == [f"step_{stop:08d}"]  # saved at the stop, not only at every_steps
    assert "Ctrl-C again stops at once, without saving" in run.output and "Traceback" not in run.output
    resumed = Run(run_dir, "checkpoint.every_steps=100").finish()
    assert f"resumed from {run_dir}/checkpoints/step_{stop:08d} at step {stop}" in resumed.output


def test_a_second_ctrl_c_stops_at_once():
    import signal
    from mto_ds.engine.signals import StopRequest
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        stop = StopRequest()
        stop._handle(signal.SIGINT, None)
        assert stop.signal_name == "SIGINT" and stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGTERM, None)  # a scheduler's TERM after it changes nothing
        assert stop.signal_name == "SIGINT"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_the_sample_trace_sets_aside_the_steps_a_resume_runs_again(tmp_path):
    """MTO_DS_TRACE_SAMPLES rows were only appended: after a crash between saves, the steps the
    resumed start ran again were in samples/rank*.jsonl twice (metrics.jsonl moves them aside).
    Rank 0 also trims the files of ranks an earlier, larger world had."""
    from mto_ds.engine.faults import SampleTrace
    samples = tmp_path / "samples"
    samples.mkdir()
    for rank in range(3):  # a 3-rank start logged steps 1-5, then crashed; its last save was step 3
        (samples / f"rank{rank}.jsonl").write_text("".join(
            json.dumps({"step": s, "rank": rank, "world_size": 3, "micro_batches": [[s]]}) + "\n" for s in range(1, 6))
            + '{"step": 6, "ra')  # cut short by the crash
    for rank in (1, 0):  # resumed on 2 ranks from step 3
        SampleTrace(tmp_path, rank, 2, enabled=True, start_step=3)
    for rank in range(3):
        kept = [json.loads(line)["step"] for line in (samples / f"rank{rank}.jsonl").read_text().splitlines()]
        moved = (samples / f"rank{rank}.jsonl.superseded").read_text().splitlines()
        assert kept == [1, 2, 3] and [json.loads(line)["step"] for line in moved[:2]] == [4, 5], rank
        assert moved[2] == '{"step": 6, "ra'
    trace = SampleTrace(tmp_path, 0, 2, enabled=True, start_step=3)
    trace.record(4, [{"index": torch.tensor([7, 8])}])
    assert json.loads((samples / "rank0.jsonl").read_text().splitlines()[-1]) == {
        "step": 4, "rank": 0, "world_size": 2, "micro_batches": [[7, 8]]}


CLIP_ON_RESUME = r"""
import json, os
import deepspeed, numpy as np, torch
from mto_ds.engine.builder import param_groups, skip_unread_grad_norm
from mto_ds.engine.checkpoint import Checkpointer
from mto_ds.engine.step import train_step
from mto_ds.models import create_mim_model, mask_fn_for
deepspeed.init_distributed(dist_backend="gloo")
out = os.environ["OUT_DIR"]

def engine(clip, bf16):
    torch.manual_seed(0)
    model = create_mim_model("vit_tiny_patch16", "simmim", img_size=32, mto={},
                             encoder_overrides={"embed_dim": 48, "num_heads": 2, "depth": 2})
    ds = json.load(open("ds_configs/cpu_zero2.json"))
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
              gradient_clipping=clip)
    if bf16:
        ds.update(bf16={"enabled": True})
    skip_unread_grad_norm(ds)  # as builder.deepspeed_config does: no clipping in bf16, no norm
    return deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=ds)[0], model

results = []
for bf16, saved, now in ((False, 5.0, 1.0), (True, 5.0, 0.0)):
    first, model = engine(saved, bf16)
    mask_fn = mask_fn_for(model, "simmim", 32, None, 16)
    batch = {"images": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "index": torch.arange(4),
             "mask": torch.stack([torch.from_numpy(mask_fn(np.random.default_rng(i))) for i in range(4)])}
    train_step(first, [batch], 1.0, False, 4.0, seeds=[0])
    tag = f"{out}/checkpoints/step_{len(results):08d}"
    first.save_checkpoint(f"{out}/checkpoints", tag=os.path.basename(tag))
    second, _ = engine(now, bf16)
    try:
        Checkpointer._load(second, __import__("pathlib").Path(tag))
        results.append([second.optimizer.clip_grad, getattr(second.optimizer, "compute_grad_norm", None)])
    except Exception as err:
        results.append(f"{type(err).__name__}: {err}")
json.dump(results, open(f"{out}/rank0.json", "w"))
"""


def test_a_resume_clips_gradients_as_the_runs_train_clip_grad_says_not_as_the_checkpoint_did(tmp_path):
    """DeepSpeed's ZeRO-1/2 optimizer takes the clip value saved in the checkpoint: a run resumed
    with another train.clip_grad kept the old one (5.0 for 1.0; unclipped for 5.0), and a bf16
    run that stopped clipping could not load any of its checkpoints (DeepSpeed refuses a clipped
    one with the gradient norm off), each called damaged. ROBUSTNESS.md: the new value applies."""
    (tmp_path / "script.py").write_text(CLIP_ON_RESUME)
    result = subprocess.run([sys.executable, str(tmp_path / "script.py")], cwd=REPO, capture_output=True, text=True,
                            env=cpu_env(OUT_DIR=str(tmp_path), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # fp32 keeps the norm (its non-finite check reads it); bf16 without clipping has it off again.
    assert json.loads((tmp_path / "rank0.json").read_text()) == [[1.0, True], [0.0, False]]
