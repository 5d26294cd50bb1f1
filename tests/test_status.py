"""`mto-ds status`: where runs stand, from their files alone. Run directories are written here as
the trainer writes them (state.json, starts.jsonl, metrics.jsonl, checkpoints/step_N/complete.json,
running.json); test_cli.py reads a real run's."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mto_ds.engine.run_dir import claim
from mto_ds.engine.status import describe_status, read_run, runs_at, watch_holders
from mto_ds.eval.study import StudyError

from conftest import REPO, cpu_env

BATCH = 2048


def _write_run(run_dir, rows, starts, state=None, checkpoints=(), incomplete=(), evaluation=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  global_batch_size: 2048\n")
    (run_dir / "starts.jsonl").write_text("".join(json.dumps(
        {"started": f"2026-12-0{i + 1} 10:00:00", "step": step, "world_size": world, "job": f"slurm:{40 + i}",
         "total_steps": 1000, "steps_per_epoch": 100, "global_batch_size": BATCH}) + "\n"
        for i, (step, world) in enumerate(starts)))
    lines = [json.dumps({"step": s, "epoch": s / 100, "loss": 1.0 / s, "images_per_sec": ips}) for s, ips in rows]
    if evaluation:
        lines.insert(len(lines) // 2, json.dumps(evaluation))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 999, "loss": 0.1, "ep')  # cut short
    if state is not None:
        (run_dir / "state.json").write_text(json.dumps(state))
    for step in checkpoints:
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step:08d}" / "complete.json").write_text(json.dumps({"step": step}))
    for step in incomplete:  # a save cut short: no complete.json
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    return run_dir


def test_a_stopped_run_says_why_where_and_how_long_the_rest_takes_at_its_last_starts_speed(tmp_path):
    """The speed is the median images/s of the last start's rows only (it ran on 8 ranks, the
    first on 16), and the hours to go are the steps left x global batch at that speed."""
    rows = [(s, 20000.0) for s in range(10, 410, 10)] + [(s, 9000.0 + s) for s in range(410, 460, 10)]
    run = _write_run(tmp_path / "run", rows, starts=[(0, 16), (400, 8)],
                     state={"finished": False, "step": 450, "total_steps": 1000, "reason": "signal SIGTERM"},
                     checkpoints=(300, 400, 450), incomplete=(460,))
    # Saved 25 minutes ago by the saving rank's clock: what a kill now would lose.
    (run / "checkpoints" / "step_00000450" / "complete.json").write_text(json.dumps({"step": 450,
                                                                                   "time": time.time() - 1500}))
    status = read_run(run)
    assert (status.state, status.detail, status.step, status.total_steps) == ("stopped", "signal SIGTERM", 450, 1000)
    assert status.checkpoints == [450, 400, 300] and status.epoch == 4.5 and status.loss == 1 / 450
    assert status.images_per_sec == 9430.0  # the median of steps 410-450's
    assert status.hours_to_go == pytest.approx(550 * BATCH / status.images_per_sec / 3600)
    assert status.last_start == {"started": "2026-12-02 10:00:00", "step": 400, "world_size": 8, "job": "slurm:41"}
    lines = describe_status(status)
    assert lines[0] == f"{run}: stopped at step 450 of 1000 (45.0%), epoch 4.50: signal SIGTERM"
    assert lines[2].endswith("550 steps to go: about 2 min at that speed")  # 119 s
    assert "  checkpoints  3 complete: step 450, 400, 300 (the newest saved 25 min ago)" in lines
    assert "  starts       2; the last at 2026-12-02 10:00:00 from step 400 on 8 ranks (slurm:41)" in lines


def test_a_finished_run_has_no_time_to_go_and_shows_its_last_evaluation(tmp_path):
    evaluation = {"step": 500, "epoch": 5.0, "knn_top1": 41.25, "linear_top1": 48.5, "loss_mim_held_out": 0.41234}
    run = _write_run(tmp_path / "run", [(s, 100.0) for s in range(100, 1100, 100)], starts=[(0, 2)],
                     state={"finished": True, "step": 1000, "total_steps": 1000, "reason": "completed"},
                     checkpoints=(1000,), evaluation=evaluation)
    status = read_run(run)
    assert (status.state, status.step, status.hours_to_go) == ("finished", 1000, None)
    assert status.evaluation == {"epoch": 5.0, "knn_top1": 41.25, "linear_top1": 48.5, "loss_mim_held_out": 0.41234}
    assert "  evaluation   knn_top1 41.25, linear_top1 48.5, loss_mim_held_out 0.4123 (epoch 5)" in \
        describe_status(status)


def test_a_run_begun_from_other_weights_names_them_until_a_start_begins_its_weights_afresh(tmp_path):
    """model.init_from, as starts.jsonl records it: the first start's, kept by the resumes after it;
    a start that resumed nothing (checkpoint.resume=none) begins the weights anew, from its own."""
    run = _write_run(tmp_path / "run", [(s, 100.0) for s in range(10, 60, 10)], starts=[(0, 2), (30, 2)],
                     checkpoints=(30,))
    first, resumed = map(json.loads, (run / "starts.jsonl").read_text().splitlines())
    first["initialised_from"] = {"path": "runs/b/checkpoints/step_00040000", "tag": "step_00040000", "step": 40000,
                                 "saved": 1.0}
    resumed["resumed_from"] = str(run / "checkpoints" / "step_00000030")
    afresh = {**first, "step": 0, "initialised_from": {"path": "mae_pretrain_vit_large.pth", "bytes": 1_217_000_000,
                                                       "modified": 1.0}}

    def status_after(*starts):
        (run / "starts.jsonl").write_text("".join(json.dumps(start) + "\n" for start in starts))
        return read_run(run)

    status = status_after(first, resumed)
    assert status.began_from == first["initialised_from"]
    assert "  began from   runs/b/checkpoints/step_00040000 (its checkpoint step_00040000, step 40000)" in \
        describe_status(status)
    status = status_after(first, resumed, afresh)
    assert "  began from   mae_pretrain_vit_large.pth (a file of 1217.0 MB)" in describe_status(status)
    plain = {key: value for key, value in afresh.items() if key != "initialised_from"}
    status = status_after(first, resumed, plain)
    assert status.began_from is None and not any("began from" in line for line in describe_status(status))


def test_a_holder_is_running_while_its_claim_is_rewritten_and_unresponsive_when_it_is_not(tmp_path):
    rows = [(s, 50.0) for s in range(1, 6)]
    live = _write_run(tmp_path / "live", rows, starts=[(0, 2)])
    lock = claim(live, "slurm:77", beat=0.2)
    try:
        stuck = _write_run(tmp_path / "stuck", rows, starts=[(0, 2)])
        (stuck / "running.json").write_text(json.dumps(
            {"job": "slurm:78", "host": "node-far-away", "pid": 4242, "started": "2026-12-07 09:00:00"}))
        statuses = [read_run(live), read_run(stuck)]
        assert [s.state for s in statuses] == ["running", "running"]  # taken at their word, before watching
        watch_holders(statuses, beat=0.5)  # 1 s: five of the live claim's beats, if the machine is busy
    finally:
        lock.release()
    assert statuses[0].state == "running" and statuses[0].detail.startswith(f"slurm:77 on {socket.gethostname()}, pid")
    assert statuses[1].state == "unresponsive"
    assert statuses[1].detail == ("slurm:78 on node-far-away, pid 4242, started 2026-12-07 09:00:00; its running.json "
                                  "unchanged for 1 s (a start takes the run over once it stays so for 3 s)")
    # With the time to go, from the start's schedule in starts.jsonl (no state.json while it runs).
    assert statuses[0].total_steps == 1000 and statuses[0].hours_to_go == pytest.approx(995 * BATCH / 50 / 3600)
    assert describe_status(statuses[0])[2].endswith("995 steps to go: about 11.3 h at that speed")


def test_a_claim_by_a_gone_process_of_this_host_and_a_start_that_left_no_state_end_unsaid(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = _write_run(tmp_path / "killed", [(1, 50.0)], starts=[(0, 2)])
    (killed / "running.json").write_text(json.dumps(
        {"job": None, "host": socket.gethostname(), "pidns": os.readlink("/proc/self/ns/pid"),
         "pid": int(gone.stdout), "started": "2026-12-07 09:00:00"}))
    status = read_run(killed)
    assert (status.state, status.detail) == ("ended unsaid", f"no scheduler job on {socket.gethostname()}, pid "
                                             f"{int(gone.stdout)}, started 2026-12-07 09:00:00: its process is gone")
    (killed / "running.json").unlink()
    assert read_run(killed).state == "ended unsaid"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert (read_run(empty).state, read_run(empty).step) == ("not started", None)


def test_runs_are_found_below_a_folder_and_a_path_that_is_none_is_named(tmp_path):
    for name in ("b", "a"):
        _write_run(tmp_path / "sweep" / name, [(1, 1.0)], starts=[(0, 1)])
    (tmp_path / "sweep" / "notes").mkdir()
    assert runs_at([tmp_path / "sweep"]) == [tmp_path / "sweep" / "a", tmp_path / "sweep" / "b"]
    assert runs_at([tmp_path / "sweep" / "b"]) == [tmp_path / "sweep" / "b"]
    with pytest.raises(StudyError, match=f"{tmp_path / 'nothing'} does not exist"):
        runs_at([tmp_path / "nothing"])


def test_the_cli_prints_each_run_or_json_without_importing_torch(tmp_path):
    run = _write_run(tmp_path / "runs" / "r1", [(s, 10.0) for s in (1, 2)], starts=[(0, 1)],
                     state={"finished": False, "step": 2, "total_steps": 1000, "reason": "signal SIGUSR1"})
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "mto_ds", "status", str(tmp_path / "runs")],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == f"{run}: stopped at step 2 of 1000 (0.2%), epoch 0.02: signal SIGUSR1"
    assert not any(line.rsplit("|", 1)[-1].strip() == "torch" for line in result.stderr.splitlines())
    result = subprocess.run([sys.executable, "-m", "mto_ds", "status", str(run), "--json"], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True)
    [row] = json.loads(result.stdout)
    assert (row["run_dir"], row["state"], row["step"], row["checkpoints"]) == (str(run), "stopped", 2, [])
    missing = subprocess.run([sys.executable, "-m", "mto_ds", "status", str(tmp_path / "no-run")], cwd=REPO,
                             env=cpu_env(), capture_output=True, text=True)
    assert missing.returncode == 2 and f"mto-ds: {tmp_path / 'no-run'} does not exist" in missing.stderr
    # Its reader gone (`mto-ds status runs/ | head -1`): exit 141 as by SIGPIPE, no BrokenPipeError traceback.
    reader_gone = subprocess.Popen([sys.executable, "-m", "mto_ds", "status", str(run)], cwd=REPO, env=cpu_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader_gone.stdout.close()
    assert (reader_gone.wait(timeout=60), reader_gone.stderr.read()) == (141, "")
