"""The run directory as an operator meets it over a long run: resumed with other settings,
extended after it finished, moved to another path, written on a full disk, started twice.

The runs here are the demo shrunk to 64 synthetic images (2 steps per epoch), one process.
"""
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mto_ds.config import ConfigError
from mto_ds.engine.checkpoint import MARKER, Checkpointer, CheckpointWriteError, verify
from mto_ds.engine import run_dir
from mto_ds.engine.run_dir import LOCK, STALE_BEATS, RunDirectoryInUse, RunLock, claim

from conftest import REPO, cpu_env, pretrain, read_metrics
from run_control import Run, metric_steps, state

TINY = ("data.synthetic_images=64", "data.num_workers=0", "run.log_every=1", "checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(run, "train.steps=4", *TINY)
    return run


def _copy(run, to):
    shutil.copytree(run, to)
    return to


def _marker(tag, **fields):
    tag.mkdir(parents=True)
    (tag / MARKER).write_text(json.dumps({"step": 4, "world_size": 1, "files": {}, **fields}))
    return tag


def test_a_resume_with_another_model_is_a_config_error_naming_the_keys_not_damage(finished, tmp_path):
    """Resumed with another model.img_size (or arch, method), every checkpoint failed to load and
    was reported damaged, then a RuntimeError traceback (exit 1): it is a configuration mistake,
    named with the saved and the current value, before any work (exit 2)."""
    run = _copy(finished, tmp_path / "run")
    assert json.loads((run / "checkpoints" / "step_00000004" / MARKER).read_text())["model"] == {
        "model.arch": "vit_tiny_patch16", "model.method": "simmim", "model.img_size": 64}
    config = (run / "config.yaml").read_text()
    result = pretrain(run, "train.steps=6", *TINY, "model.img_size=96", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.img_size=64 there, 96 here" in result.stderr
    assert "damaged" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    # The refused start's settings are not the run's: config.yaml (which the study reads) stays.
    assert (run / "config.yaml").read_text() == config and not list(run.glob("config.*.yaml"))


def test_the_model_check_compares_only_the_keys_both_models_have(tmp_path):
    simmim = {"model.arch": "vit_tiny_patch16", "model.method": "simmim", "model.img_size": 64}
    mae = dict(simmim, **{"model.method": "mae", "model.decoder_embed_dim": 512, "model.decoder_depth": 8})
    tag = _marker(tmp_path / "checkpoints" / "step_00000004", model=simmim)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, rank=0, world_size=1, model=mae)
    with pytest.raises(ConfigError) as err:
        checkpointer.load_newest(engine=None, candidates=[tag])
    assert "(model.method=simmim there, mae here)" in str(err.value)  # no decoder keys: SimMIM has none
    old = _marker(tmp_path / "old" / "step_00000004")  # saved before checkpoints named their model
    with pytest.raises(AttributeError, match="_config"):  # past the check, to DeepSpeed's load (engine=None)
        Checkpointer(tmp_path / "old", 3, rank=0, world_size=1, model=mae).load_newest(None, [old])


def test_a_finished_run_extended_in_a_moved_directory_continues_on_the_stretched_schedule_and_says_so(
        finished, tmp_path):
    """train.steps raised after the run ended, in a run directory moved to another path (no path
    is baked into checkpoints or `latest`): it continues from its last checkpoint to the new total,
    on the schedule of the new total (as MAE's and SimMIM's own scripts do), and warns that the LR
    goes back up, with both values."""
    from mto_ds.engine.builder import learning_rate
    run = _copy(finished, tmp_path / "elsewhere" / "run")
    result = pretrain(run, "train.steps=8", *TINY)
    assert f"resumed from {run}/checkpoints/step_00000004 at step 4" in result.stderr
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    peak, warmup = 1e-3 * 32 / 256, 1  # the demo's blr x batch / 256; warm-up half an epoch of 2 steps
    assert [r["lr"] for r in rows[4:]] == pytest.approx([learning_rate(s, 8, warmup, peak, 0.0) for s in range(4, 8)])
    assert rows[3]["lr"] == pytest.approx(learning_rate(3, 4, warmup, peak, 0.0))
    assert (f"the LR schedule differs from the saved run's (total steps 4 -> 8): step 5 runs at "
            f"LR {learning_rate(4, 8, warmup, peak, 0.0):.3g}, where the saved schedule had "
            f"{learning_rate(4, 4, warmup, peak, 0.0):.3g}") in result.stderr


def test_resume_warnings_name_a_changed_lr_schedule_only_when_it_changed():
    from mto_ds.engine.run_dir import resume_warnings
    plan = {"steps_per_epoch": 8, "num_samples": 256, "seed": 0, "order": "exact", "world_size": 1,
            "micro_batch_size": 16,
            "schedule": {"total_steps": 100, "warmup_steps": 10, "peak_lr": 1e-3, "min_lr_ratio": 0.0}}
    saved = dict(plan, global_step=50)
    assert resume_warnings(saved, plan) == []
    assert resume_warnings({"global_step": 50}, plan) == []  # a checkpoint older than the key
    (message,) = resume_warnings(saved, dict(plan, schedule=dict(plan["schedule"], peak_lr=2e-3, total_steps=200)))
    assert message.startswith("the LR schedule differs from the saved run's (total steps 100 -> 200, "
                              "peak LR 0.001 -> 0.002): step 51 runs at LR 0.00179, where the saved schedule had 0.000587.")


def test_a_warm_up_as_long_as_the_run_and_an_evaluation_interval_it_never_reaches_are_warned():
    """MAE's 40 warm-up epochs in a 20-epoch budget were cut to end a step before the run without
    a word: the LR rose the whole run and never decayed. eval.every_epochs past the run's last
    epoch evaluated nothing, silently. Both are named with the keys to change."""
    from mto_ds.config import load_config
    from mto_ds.engine.builder import schedule_steps, schedule_warnings
    mae = load_config(REPO / "configs" / "vit_b_mae.yaml", ["train.epochs=20"])
    assert schedule_steps(mae, 312) == (6240, 6239)
    (warm_up,) = schedule_warnings(mae, 312)
    assert warm_up.startswith("train.warmup_epochs=40 (12480 steps) is not shorter than the run (6240 steps): "
                              "the warm-up is cut to 6239 steps")
    assert schedule_warnings(load_config(REPO / "configs" / "vit_b_mae.yaml", ["train.epochs=100"]), 312) == []
    demo = REPO / "configs" / "demo.yaml"
    (by_steps,) = schedule_warnings(load_config(demo, ["train.steps=4", "train.warmup_steps=4"]), 32)
    assert by_steps.startswith("train.warmup_steps=4 is not shorter than the run (4 steps)")
    (evaluation,) = schedule_warnings(load_config(demo, ["train.epochs=5", "eval.every_epochs=10"]), 32)
    assert evaluation.startswith("eval.every_epochs=10 evaluates at the end of epoch 10, 20, ...; this run ends "
                                 "after 160 steps (5 complete epochs of 32 steps), so it evaluates nothing")
    assert schedule_warnings(load_config(demo, ["train.epochs=10", "eval.every_epochs=10"]), 32) == []


class _DiskFullEngine:
    """Stands in for DeepSpeed's engine on a disk that fills up: the model file is cut short."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 41216 vs 41110")


class _Engine:
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)


def test_a_save_that_fails_to_write_names_the_checkpoint_and_keeps_the_last_complete_one(tmp_path):
    """torch.save on a full disk fails with 'unexpected pos 41216 vs 41110' and nothing else: the
    error says which save failed, on which rank, the free space, and that the last complete
    checkpoint is untouched; the next save of that step replaces what was left."""
    ckpt = tmp_path / "checkpoints"
    checkpointer = Checkpointer(ckpt, keep_last=2, rank=0, world_size=1)
    checkpointer.save(_Engine(), 3, {}, {})
    with pytest.raises(CheckpointWriteError) as err:
        checkpointer.save(_DiskFullEngine(), 6, {}, {})
    message = str(err.value)
    assert message.startswith(f"saving checkpoint {ckpt}/step_00000006 failed on rank 0: RuntimeError: "
                              "[enforce fail at inline_container.cc:672] . unexpected pos 41216 vs 41110 (")
    assert "GB free on its file system" in message
    assert message.endswith(f"the newest complete checkpoint, {ckpt}/step_00000003, is untouched, and a "
                            "resume continues from it")
    assert isinstance(err.value, OSError)
    assert [p.name for p in checkpointer.complete_tags()] == ["step_00000003"]
    assert verify(ckpt / "step_00000003") is None and (ckpt / "latest").read_text() == "step_00000003"
    checkpointer.save(_Engine(), 6, {}, {})
    assert [p.name for p in checkpointer.complete_tags()] == ["step_00000006", "step_00000003"]
    assert verify(ckpt / "step_00000006") is None


def test_a_run_stopped_by_a_write_error_in_its_telemetry_still_says_why_in_state_json(tmp_path):
    """Files limited to 8 KiB (ulimit -f: a quota, a full disk) make the metrics or TensorBoard
    write fail mid-run. Closing the telemetry failed again on the way out, and state.json, which
    job scripts read, was never written."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mto_ds", "pretrain", "--config", "configs/demo.yaml", f"run.output_dir={run}",
           "run.progress_bar=false", "train.steps=30", "checkpoint.every_steps=0", *TINY[:3]]
    result = subprocess.run(["bash", "-c", 'ulimit -f 8 && exec "$@"', "bash", *cmd], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] is False and state["reason"].startswith("error: OSError: [Errno 27] File too large")


def test_state_json_that_cannot_be_written_is_removed_rather_than_left_from_an_earlier_start(tmp_path, monkeypatch,
                                                                                               caplog):
    run_dir.write_state(tmp_path, False, 5, 10, "signal SIGUSR1")

    def disk_full(path, text, only_if_absent=False):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_dir, "atomic_write", disk_full)
    with caplog.at_level(logging.ERROR, logger="mto_ds"):
        run_dir.write_state(tmp_path, False, 7, 10, "error: OSError: [Errno 28] No space left on device")
    assert not (tmp_path / "state.json").exists()
    assert f"could not write {tmp_path}/state.json (No space left on device)" in caplog.text


@pytest.mark.parametrize("hard_links", [True, False])
def test_of_the_failures_written_to_state_json_the_first_stays(tmp_path, monkeypatch, caplog, hard_links):
    """Where one rank fails, the others fail after it, of its absence: their reasons must not
    replace the first one's. Without hard links (some shared file systems) the same holds."""
    from mto_ds.engine import storage
    if not hard_links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(storage.os, "link", no_links)
    first = "error: rank 3 of 8: OutOfMemoryError: CUDA out of memory"
    run_dir.write_state(tmp_path, False, 7, 10, first, first=True)
    with caplog.at_level(logging.ERROR, logger="mto_ds"):
        run_dir.write_state(tmp_path, False, 7, 10, "error: rank 0 of 8: DistBackendError: timeout", first=True)
    assert state(tmp_path)["reason"] == first
    assert "this rank's reason, after another rank's" in caplog.text and "DistBackendError" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left
    run_dir.write_state(tmp_path, True, 10, 10, "completed")  # a start's own outcome replaces it
    assert state(tmp_path)["reason"] == "completed"


# --- two starts on one run directory ---------------------------------------------------------

def _claim_in(run_dir) -> dict:
    """running.json as its live holder last wrote it: the heartbeat rewrites the file in place,
    so a read can catch it empty or cut short (seen once in the suite): read again."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return json.loads((run_dir / LOCK).read_text())
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _held_by(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"job": None, "host": "elsewhere", "pid": 1, "started": "then",
                                            "token": "theirs", "beat": 0, **owner}))


def test_a_live_start_keeps_the_run_directory_and_a_dead_ones_claim_is_taken_over(tmp_path, caplog, monkeypatch):
    beat = 0.5
    watch = 4 * beat  # the holder's heartbeat shares this process: starved for 12 s, not 3, before it looks dead
    first = claim(tmp_path, "slurm:41", beat=beat)
    held = _claim_in(tmp_path)
    assert (held["job"], held["host"], held["pid"]) == ("slurm:41", socket.gethostname(), os.getpid())
    with pytest.raises(RunDirectoryInUse, match=f"run.output_dir={tmp_path} is in use by another start "
                                                f"\\(slurm:41 on {socket.gethostname()}, pid {os.getpid()}"):
        claim(tmp_path, "slurm:42", beat=watch)  # its heartbeat goes on while this one watches
    first.release()
    assert not (tmp_path / LOCK).exists()

    # Left by a start that was killed: a process of this host that is gone is taken over at once,
    # as is this Slurm job's own earlier run (a requeue); another host's only once it stopped beating.
    dead, zombie = (subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2))
    dead.wait()
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # ended, not yet reaped
    here = {"host": socket.gethostname(), "pidns": os.readlink("/proc/self/ns/pid")}

    def not_watched(*args):
        raise AssertionError("a claim known to have ended was watched for a heartbeat")
    monkeypatch.setattr(run_dir, "_heartbeat", not_watched)
    for owner, job, ended in [({**here, "pid": dead.pid}, None, f"no scheduler job on {here['host']}, pid {dead.pid}: "
                                                                "its process is gone"),
                              ({**here, "pid": zombie.pid}, None, f"no scheduler job on {here['host']}, pid {zombie.pid}: "
                                                                  "its process is gone"),
                              ({"job": "slurm:41", "restart": 0}, "slurm:41",
                               "slurm:41 on elsewhere, pid 1: an earlier run of this job, restart 0")]:
        _held_by(tmp_path, **owner)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mto_ds"):
            claim(tmp_path, job, beat=beat, restart=1).release()
        # taken at once, not after watching (a wall-clock bound failed whenever the worker stalled)
        assert f"taking the run directory over from a start that has ended ({ended})" in caplog.text
    monkeypatch.undo()
    # A pid that is gone here may live in another PID namespace of a host of the same name (a
    # container on the host's network): watched, as another host's claim is, not taken at once.
    _held_by(tmp_path, host=here["host"], pidns="pid:[1]", pid=dead.pid)
    began = time.monotonic()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mto_ds"):
        lock = claim(tmp_path, None, beat=beat)
    assert time.monotonic() - began >= STALE_BEATS * beat
    assert f"ended (no scheduler job on {here['host']}, pid {dead.pid}: unchanged for {STALE_BEATS * beat:.0f} s)" \
        in caplog.text
    assert _claim_in(tmp_path)["token"] == lock.owner["token"]
    _held_by(tmp_path)  # taken over by another start while this one lived: not this one's to remove
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "theirs"
    zombie.wait()


def test_a_live_process_of_another_user_is_watched_not_taken_for_gone(tmp_path, monkeypatch, caplog):
    """os.kill(pid, 0) on another user's live process fails with EPERM: it lives. Its claim is
    watched for a heartbeat (and taken only once that stopped), as a live process's is."""
    def another_users(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(run_dir.os, "kill", another_users)
    _held_by(tmp_path, host=socket.gethostname(), pidns=os.readlink("/proc/self/ns/pid"), pid=4321)
    beat = 0.05
    with caplog.at_level(logging.WARNING, logger="mto_ds"):
        claim(tmp_path, None, beat=beat).release()
    assert f"pid 4321: unchanged for {STALE_BEATS * beat:.0f} s)" in caplog.text
    assert "its process is gone" not in caplog.text


def test_a_heartbeat_counts_up_and_stops_for_good_once_another_start_took_over(tmp_path):
    """The claim's `beat` goes up at each beat (how a watcher sees it alive). Once another start's
    claim is found, this start's heartbeat stops: writing its own claim back would make the other
    start think it was taken over in turn. A claim that cannot be read proves nothing."""
    beat = 0.1
    lock = claim(tmp_path, "slurm:41", beat=beat)
    deadline = time.monotonic() + 100 * beat
    while _claim_in(tmp_path)["beat"] < 2:
        assert time.monotonic() < deadline, _claim_in(tmp_path)
        time.sleep(beat / 4)
    deadline = time.monotonic() + 100 * beat
    while not (_held_by(tmp_path, job="slurm:42") or lock.lost.is_set()):  # a beat in flight may write back once
        assert time.monotonic() < deadline
        time.sleep(beat / 4)
    time.sleep(5 * beat)
    assert _claim_in(tmp_path)["token"] == "theirs"
    lock.release()
    assert _claim_in(tmp_path)["token"] == "theirs"  # not this start's to remove

    # What one look at the file says (the heartbeat's own rewrite is off: one beat an hour).
    idle = RunLock(tmp_path / "claim", {"token": "mine", "beat": 0}, beat=3600)
    (tmp_path / "claim").mkdir()  # a read that fails (EISDIR): not a takeover
    assert not idle._taken_over()
    (tmp_path / "claim").rmdir()
    assert idle._taken_over()  # removed: a takeover removes the claim before it makes its own
    for token, taken in (("mine", False), ("theirs", True)):
        (tmp_path / "claim").write_text(json.dumps({"token": token}))
        assert idle._taken_over() == taken, token
    idle.release()


def test_a_heartbeat_that_fails_to_read_or_rewrite_its_own_claim_keeps_the_run_directory(tmp_path, monkeypatch):
    """A rewrite that fails on a full disk leaves running.json empty (opened for writing, then
    ENOSPC), and a read can fail or catch a file cut short: neither is another start's claim. The
    heartbeat took each for a takeover and the run stopped (exit 2, no state.json, not requeued);
    it now rewrites its claim at the next beat and stops only for another start's claim or none."""
    beat = 0.2
    lock = claim(tmp_path, "slurm:41", beat=beat)
    path = tmp_path / LOCK
    disk = threading.Lock()  # a beat's write and the test's switch of the disk's state never interleave
    failed_writes = []

    def full_disk(file, mode="r", *args, **kwargs):
        with disk:
            if Path(file) == path and "w" in mode and not failed_writes[-1:] == ["freed"]:
                Path(file).write_text("")  # what opening for writing did before the write failed
                failed_writes.append("ENOSPC")
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(file, mode, *args, **kwargs)

    def within(beats, condition):  # the suite runs beside another worker: a beat can be late
        deadline = time.monotonic() + beats * beat
        while not condition() and time.monotonic() < deadline:
            time.sleep(beat / 4)
        return condition()

    monkeypatch.setattr(run_dir, "open", full_disk, raising=False)
    assert within(50, lambda: failed_writes.count("ENOSPC") >= 2)  # two beats in a row failed
    with disk:
        assert path.read_text() == "" and not lock.lost.is_set()
        failed_writes.append("freed")
        path.write_text('{"job": "slurm:41", "tok')  # read cut short

    def own_claim():
        try:
            return json.loads(path.read_text())["token"] == lock.owner["token"]
        except ValueError:
            return False

    assert within(50, own_claim)  # rewritten at a beat
    assert not lock.lost.is_set()

    # A takeover removes the claim before it creates its own (again here, if a beat in flight
    # wrote its claim back).
    assert within(50, lambda: path.unlink(missing_ok=True) or lock.lost.is_set())
    lock.release()


def test_a_live_start_of_the_same_slurm_job_run_is_watched_not_taken_over(tmp_path):
    """Two sruns in one allocation (or two commands in one salloc shell) share SLURM_JOB_ID: the
    second took the first's live claim at once, as if it were a requeue's dead start, and both
    then wrote the run directory. Only a higher SLURM_RESTART_COUNT means the claim's run ended."""
    beat = 0.5
    watch = 4 * beat  # the holder's heartbeat shares this process: starved for 12 s, not 3, before it looks dead
    first = claim(tmp_path, "slurm:41", beat=beat, restart=2)
    assert _claim_in(tmp_path)["restart"] == 2
    # The same run of the job, a lower count, and another job at a higher count (its own requeue
    # says nothing of this job's run): watched, refused while it beats.
    for job, restart in (("slurm:41", 2), ("slurm:41", 1), ("slurm:42", 3)):
        with pytest.raises(RunDirectoryInUse, match=f"in use by another start \\(slurm:41 on {socket.gethostname()}, "
                                                    f"pid {os.getpid()}"):
            claim(tmp_path, job, beat=watch, restart=restart)
    assert _claim_in(tmp_path)["token"] == first.owner["token"]
    first.release()


def test_a_second_start_on_a_running_run_directory_stops_before_touching_it(tmp_path):
    """A duplicate sbatch while the first job runs: the second start resumed from the first's
    checkpoints, set aside and pruned its saves and moved its metrics rows (the first then failed
    with FileNotFoundError in its next save). It now stops at once, naming the first, and the
    first runs on undisturbed."""
    run = tmp_path / "run"
    # Each micro-batch 1 s late: the first start only has to stay alive while the second starts,
    # sleeping rather than training flat out on the cores that start needs.
    first = Run(run, steps=200, env={"MTO_DS_FAULT_DATA_STALL": "1"})
    first.wait_for_step(2)
    config = (run / "config.yaml").read_text()
    second = pretrain(run, "train.steps=200", "train.blr=0.5", check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"mto-ds: config error: run.output_dir={run} is in use by another start (no scheduler job on " \
           f"{socket.gethostname()}, pid {first.proc.pid}" in second.stderr
    assert (run / "config.yaml").read_text() == config and not (run / "state.json").exists()
    first.signal_ranks(signal.SIGUSR1)
    first.finish()
    assert state(run)["reason"] == "signal SIGUSR1" and metric_steps(run) == list(range(1, state(run)["step"] + 1))
    assert not (run / LOCK).exists()  # released at the end: the next start need not wait


def test_a_start_whose_run_directory_was_taken_over_stops_without_saving(tmp_path):
    """A start whose heartbeat stalled (a file server's pause) while a duplicate watched is taken
    over; it only warned and trained on, both starts then saving, pruning and moving metrics in
    one directory. It now stops within a beat and a step, exit 2, saving nothing and leaving
    state.json and running.json to the start that holds the directory."""
    run = tmp_path / "run"
    first = Run(run, "checkpoint.every_steps=0", steps=400,  # saves only at the end or on a stop
                env={"MTO_DS_FAULT_DATA_STALL": "0.5"})  # alive, not busy, until it notices
    first.wait_for_step(2)
    theirs = {"job": "slurm:42", "host": "elsewhere", "pid": 1, "started": "now", "token": "theirs", "beat": 0}
    # What a start that took the directory over writes; again if a beat in flight (between its
    # read and its write) wrote its own claim back over it.
    while first.proc.poll() is None:
        if (run / LOCK).read_text() != json.dumps(theirs):
            (run / LOCK).write_text(json.dumps(theirs))
        time.sleep(0.5)
    first.finish(expect=2)
    assert f"run.output_dir={run} was taken over by another start while this one ran" in first.output
    assert json.loads((run / LOCK).read_text()) == theirs and not (run / "state.json").exists()
    assert max(metric_steps(run)) < 400 and not list(run.glob("checkpoints/step_*"))


def test_a_claim_read_while_its_owner_rewrote_it_is_refused_naming_the_owner(tmp_path, monkeypatch):
    """The heartbeat rewrites running.json in place, so a start can read it empty. It must still
    refuse (the file changes: its owner lives) and name the owner from the rewritten file, not "?"."""
    beat = 0.5
    first = claim(tmp_path, "slurm:41", beat=beat)
    first._stop.set()  # this test writes the beats: empty first, then the owner's next beat
    first._thread.join()
    (tmp_path / LOCK).write_text("")
    watching = threading.Event()

    def watch(*args):
        watching.set()
        return heartbeat(*args)

    heartbeat = run_dir._heartbeat
    monkeypatch.setattr(run_dir, "_heartbeat", watch)

    def next_beat():  # once the second start has read the empty file and watches it
        watching.wait(60)
        time.sleep(beat)
        (tmp_path / LOCK).write_text(json.dumps(dict(first.owner, beat=1)))

    writer = threading.Thread(target=next_beat)
    writer.start()
    with pytest.raises(RunDirectoryInUse, match=f"in use by another start \\(slurm:41 on {socket.gethostname()}, "
                                                f"pid {os.getpid()}"):
        claim(tmp_path, "slurm:42", beat=beat)
    writer.join()
    first.release()
    assert not (tmp_path / LOCK).exists()
