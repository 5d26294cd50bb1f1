"""DeepSpeed checkpoints that become the newest only once complete on every rank.

Layout under run_dir/checkpoints/:
    step_00000120/          engine.save_checkpoint(tag=...) output of all ranks
    step_00000120/complete.json   written by rank 0 after a barrier: the save finished everywhere
    latest                  DeepSpeed's pointer file, rewritten atomically after complete.json
A save killed midway leaves a tag without complete.json, which resume never picks.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

log = logging.getLogger("mto_ds")
MARKER = "complete.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int):
        self.dir, self.keep_last, self.rank, self.world_size = Path(directory), keep_last, rank, world_size

    def complete_tags(self, root: Optional[Path] = None) -> List[Path]:
        """Complete checkpoints, newest first."""
        root = Path(root or self.dir)
        if (root / MARKER).is_file():  # a single checkpoint directory was named
            return [root]
        tags = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
        return sorted(tags, key=lambda p: json.loads((p / MARKER).read_text())["step"], reverse=True)

    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "time": time.time(), **meta}
            _atomic_write(self.dir / tag / MARKER, json.dumps(marker, indent=1))
            _atomic_write(self.dir / "latest", tag)
            self._prune()
        _barrier()
        return self.dir / tag

    def _prune(self) -> None:
        complete = self.complete_tags()
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
        newest = complete[0].name if complete else ""
        for partial in self.dir.glob("step_*"):  # saves that never completed, older than the newest
            if not (partial / MARKER).exists() and partial.name < newest and not partial.name.endswith("_universal"):
                shutil.rmtree(partial, ignore_errors=True)

    def candidates(self, resume: str) -> List[Path]:
        if resume == "none":
            return []
        if resume == "auto":
            return self.complete_tags() if self.dir.is_dir() else []
        path = Path(resume)
        found = self.complete_tags(path) if path.is_dir() else []
        if not found:
            raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there "
                                    f"(a directory with {MARKER}, or a checkpoints/ folder holding some)")
        return found


def read_marker(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / MARKER).read_text())


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (for another world size)."""
    out = tag_dir.with_name(tag_dir.name + "_universal")
    if (out / MARKER).is_file():
        return out
    tmp = tag_dir.with_name(tag_dir.name + "_universal.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{result.stderr[-3000:]}")
    shutil.copy(tag_dir / MARKER, tmp / MARKER)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
