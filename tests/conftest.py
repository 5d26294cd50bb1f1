"""Shared helpers: run the CLI as users do (plain process or torchrun ranks on gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The environment the suite started with. Importing cv2 (FFCV's tests do, in this process) adds
# LD_LIBRARY_PATH and QT_* entries; inherited by later subprocesses, they changed DeepSpeed's JIT
# build of its CPU comm op, which then rebuilt (about 40 s) each time the two kinds alternated.
_START_ENV = dict(os.environ)

# bf16 and fp16 on a CPU without kernels for them (CI's AVX2 EPYC: a bf16 matmul about 40x an
# fp32 one) cost seconds per demo step. Tests of the half-precision plumbing train the demo model
# at 32 px (5 tokens, not 17) on global batches of 16, and MAE with a small decoder: its default
# one (512 wide, 8 deep) is most of a demo step's work, and no test of the engine depends on its size.
HALF_PRECISION_SMALL = ("model.img_size=32", "train.global_batch_size=16")
SMALL_MAE_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 2}
SMALL_MAE_DECODER_OVERRIDES = tuple(f"model.{key}={value}" for key, value in SMALL_MAE_DECODER.items())


# No process started with cpu_env compiles anything (train.compile is tested in test_mto.py's
# process and in test_fused_attention.py's own child), yet each DeepSpeed engine imports DeepSpeed's
# Muon optimizer, whose torch.compile decorators import inductor: up to 2 s of CPU per rank process
# here, and the suite starts over a hundred. With dynamo disabled, torch.compile hands back the function.
NO_COMPILER = {"TORCHDYNAMO_DISABLE": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on a shared 2-core machine: thread hand-offs cost more than they save
    (100 tiny AdamW steps: 7.7 s with 2 threads, 0.27 s with 1)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_env(**extra) -> dict:
    env = dict(_START_ENV)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # One build of DeepSpeed's CPU comm op for the whole suite, kept with the venv, not in a
    # per-user cache that other environments rebuild (60-130 s each time).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(NO_COMPILER)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # A script run by path imports mto_ds from this checkout, not from wherever the venv's editable
    # install points (a second checkout or worktree sharing the venv would test the other's code).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(run_dir: Path, *overrides: str, nproc: int = 1, config: str = "configs/demo.yaml",
             check: bool = True, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
    """`mto-ds pretrain` on the demo config with overrides; nproc > 1 runs under torchrun."""
    args = ["-m", "mto_ds", "pretrain", "--config", config, f"run.output_dir={run_dir}",
            "run.progress_bar=false", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(**(env_extra or {})), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"pretrain failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run of the demo config (vit_tiny_patch16 at 64 px, SimMIM + MTO, ZeRO-2) after 2 steps, with
    one complete checkpoint: read, never written, by the tests that use it. Trained by README's
    DeepSpeed launcher command on one rank (`deepspeed --module mto_ds pretrain ...`), whose output
    is kept beside it in launcher_output.txt for test_cli's check of that command."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                             "--master_port", str(free_port()), "--module", "mto_ds", "pretrain",
                             "--config", "configs/demo.yaml", f"run.output_dir={run}", "train.steps=2",
                             "run.progress_bar=false", "data.synthetic_images=64"],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"the deepspeed launcher's run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-6000:]}")
    (run.parent / "launcher_output.txt").write_text(result.stdout + result.stderr)
    return run


def checkpoint_bytes(tag_dir: Path) -> int:
    """The bytes of a saved checkpoint's files (complete.json left out)."""
    from mto_ds.engine.checkpoint import file_sizes
    return sum(file_sizes(tag_dir).values())


def checkpoint_space_of(ds_file: str, img_size: int):
    """checkpoint_space for the demo's model (SimMIM ViT-Ti, MTO on) at img_size under ds_configs/ds_file."""
    from mto_ds.config import load_config
    from mto_ds.engine.checkpoint import checkpoint_space
    from mto_ds.models import create_mim_model
    model = create_mim_model("vit_tiny_patch16", "simmim", img_size=img_size, mto={"enabled": True})
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds = json.loads((REPO / "ds_configs" / ds_file).read_text())
    return checkpoint_space(load_config(REPO / "configs" / "demo.yaml").checkpoint, ds, params, epochs=0)


def read_metrics(run_dir: Path) -> list:
    """The logged optimizer steps of metrics.jsonl; a line still being written (no newline yet:
    tests poll the file of a live run) is left out."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().split("\n")[:-1]
    return [row for row in map(json.loads, filter(None, lines)) if "loss" in row]
