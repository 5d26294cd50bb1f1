"""What a run does when its data is not what it should be: ranks that read different data sets
(node-local copies that differ), micro-batches or whole global batches with no image decoded.
The rest of the run's failure handling: test_robustness.py."""
import json
import math
import subprocess
import sys

from conftest import REPO, cpu_env, free_port, pretrain, read_metrics


# --- every rank must read the same data set ---------------------------------------------------

def test_ranks_whose_node_local_copies_of_the_data_differ_are_refused_naming_both(tmp_path):
    """Each rank lists data.path itself. A node-local copy short of one image gives that rank
    another sample count and so another order every epoch (samples read twice, others never):
    the start must stop before training, naming each rank's data set, and write no checkpoint."""
    from mto_ds.data import write_image_folder
    nodes = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for node in nodes:  # the same relative data.path on two "nodes", as node-local disks hold it
        write_image_folder(node / "images", num_images=16, num_classes=2, size=40)
    next((nodes[1] / "images").rglob("*.JPEG")).unlink()
    run_dir, port = tmp_path / "run", free_port()
    args = [sys.executable, "-m", "mto_ds", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
            f"run.output_dir={run_dir}", "run.progress_bar=false", "data.source=folder", "data.path=images",
            "data.num_workers=0", "model.img_size=32", "model.mask_patch_size=16", "train.global_batch_size=4",
            "train.steps=2"]
    ranks = [subprocess.Popen(args, cwd=node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cpu_env(PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank, node in enumerate(nodes)]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    for output in outputs:
        assert "the ranks read different data sets at images" in output, output[-3000:]
        assert "rank 0: 16 samples" in output and "rank 1: 15 samples" in output
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert json.loads((run_dir / "state.json").read_text())["finished"] is False


# --- undecodable images -----------------------------------------------------------------------

FOLDER_RUN = ("data.source=folder", "data.num_workers=0", "model.img_size=32", "model.mask_patch_size=16",
              "run.log_every=1")


def test_a_micro_batch_with_no_image_decoded_is_a_stand_in_of_weight_zero_and_the_run_finishes(tmp_path):
    """Micro-batches of 1 on 2 ranks: the one holding the zero-byte file has nothing decoded. Its
    rank used to raise alone (the other waited in the collective until its timeout, and every
    requeue met the file at the same step); now it steps with a stand-in that is no sample."""
    from mto_ds.data import write_image_folder
    images = write_image_folder(tmp_path / "images", num_images=8, num_classes=2, size=40)
    broken = sorted(images.rglob("*.JPEG"))[3]
    broken.write_bytes(b"")
    run_dir = tmp_path / "run"
    result = pretrain(run_dir, *FOLDER_RUN, f"data.path={images}", "train.global_batch_size=2",
                      "train.micro_batch_size=1", "train.steps=4", nproc=2)  # one epoch: every image once
    assert broken.name in result.stdout + result.stderr
    # 32 px in 16 px cells: ceil(0.6 x 4) = 3 of 4 cells, said once (rank 0), not silently trained.
    assert (result.stdout + result.stderr).count("model.mask_ratio=0.6 masks 0.75 of the patches") == 1
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True


def test_a_global_batch_with_no_image_decoded_stops_the_run_naming_the_data_path(tmp_path):
    (tmp_path / "images" / "c0").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        (tmp_path / "images" / "c0" / f"{name}.JPEG").write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    result = pretrain(run_dir, *FOLDER_RUN, f"data.path={tmp_path / 'images'}", "train.global_batch_size=2",
                      "train.steps=2", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no image of step 1's global batch could be decoded" in result.stderr
    assert json.loads((run_dir / "state.json").read_text())["finished"] is False
