"""RUN/starts.jsonl's facts: the code's commit and state, the ranks that run other versions than
rank 0, the log line. A run's own starts.jsonl across three world sizes: tests/test_resume.py."""
import subprocess

from mto_ds.engine.provenance import code_version, describe, differing_ranks, start_record


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_code_version_is_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path):
    assert code_version(tmp_path)["commit"] is None and code_version(tmp_path)["dirty"] is None  # no git checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert code_version(tmp_path)["commit"] == head and code_version(tmp_path)["dirty"] is False
    (tmp_path / "notes.txt").write_text("untracked: not the code that ran")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "train.py").write_text("print('v2')\n")
    assert code_version(tmp_path) == {"version": code_version(tmp_path)["version"], "commit": head, "dirty": True}


def _environment(host, torch="2.5.1", commit="abc", device="NVIDIA H100 80GB HBM3"):
    return {"host": host, "device": device, "code": {"version": "0.1.0", "commit": commit, "dirty": False},
            "libraries": {"torch": torch, "deepspeed": "0.19.8", "timm": "1.0.31", "cuda": "12.4", "nccl": "2.21.5"}}


def test_ranks_with_other_versions_than_rank_0_are_named_with_what_differs():
    same = [_environment("node1"), _environment("node1"), _environment("node2")]
    assert differing_ranks(same) == []
    mixed = [*same, _environment("node3", torch="2.4.0"), _environment("node3", commit="def")]
    assert differing_ranks(mixed) == ["rank 3 (node3): libraries.torch 2.4.0 here, 2.5.1 on rank 0",
                                      "rank 4 (node3): code.commit def here, abc on rank 0"]
    many = [_environment("node1")] + [_environment(f"node{i}", torch="2.4.0") for i in range(2, 7)]
    assert differing_ranks(many)[3:] == ["and 2 more ranks"] and len(differing_ranks(many)) == 4


def test_a_start_record_counts_hosts_and_devices_and_its_log_line_names_them():
    environments = [_environment("node1")] * 8 + [_environment("node2")] * 8
    schedule = {"total_steps": 500400, "steps_per_epoch": 625, "global_batch_size": 2048}
    record = start_record(environments, step=1200, resumed_from=None, job="slurm:42", schedule=schedule)
    assert (record["world_size"], record["step"], record["job"]) == (16, 1200, "slurm:42")
    assert {key: record[key] for key in schedule} == schedule
    assert record["hosts"] == {"node1": 8, "node2": 8} and record["devices"] == {"NVIDIA H100 80GB HBM3": 16}
    assert describe(record) == ("mto_ds 0.1.0 (git abc), torch 2.5.1 (CUDA 12.4, NCCL 2.21.5), deepspeed 0.19.8, "
                                "timm 1.0.31; 16 rank(s) on 2 hosts: 16 x NVIDIA H100 80GB HBM3")
