"""A run's weights on disk, read without the engine: the complete checkpoints of a run directory
(the layout engine/checkpoint.py writes) and a MIM model's encoder with timm's key names.

eval/ reads checkpoints through this module and engine/ writes them by its names, so the
package's imports keep one direction (engine -> eval -> models), as timm keeps its checkpoint
helpers beside its models.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

# Written last into a checkpoint directory, once every rank's files are on storage: a directory
# without it is a save that did not finish, never read.
MARKER = "complete.json"
TAG = re.compile(r"step_\d{8}")


def read_marker(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / MARKER).read_text())


def kept_for_good(tag_dir: Path) -> bool:
    """A checkpoint saved at an epoch that checkpoint.keep_every_epochs keeps: pruning never takes it."""
    try:
        return bool(read_marker(tag_dir).get("kept"))
    except (OSError, ValueError):
        return False


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints under a checkpoints directory, newest first; a complete checkpoint
    directory itself is the one."""
    root = Path(root)
    if (root / MARKER).is_file():
        return [root]
    tags = [p for p in root.glob("step_*") if TAG.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(tags, key=lambda p: p.name, reverse=True)  # zero-padded: name order is step order


def newest_complete(path: Path) -> Path:
    """The newest complete checkpoint of a run directory, a checkpoints directory or a checkpoint."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = complete_checkpoints(root)
            if found:
                return found[0]
    raise FileNotFoundError(f"no complete checkpoint under {path}")


def encoder_state(model_state: dict) -> dict:
    """A MIM model's state dict -> its encoder's, fp32, with timm's key names (no decoder, no mask token)."""
    return {k[len("encoder."):]: v.float().contiguous() for k, v in model_state.items() if k.startswith("encoder.")}


# A MIM model's parameters beside its encoder's (ours and facebookresearch/mae's names): SimMIM's
# `decoder`, MAE's `decoder_*`, both methods' `mask_token`.
BESIDE_ENCODER = ("decoder", "mask_token")


def _torch_load_weights(path: Path):
    """torch.load with weights_only; a file it cannot read is a ValueError in one line."""
    import torch
    try:
        # facebookresearch/mae's training checkpoints keep their arguments as an argparse.Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # torch's own messages run to paragraphs, and suggest weights_only=False: its first sentence.
        text = str(err).strip()
        said = text.splitlines()[0].split(". ")[0] if text else "the file ends early"
        # A file of a DeepSpeed checkpoint holds partitions or a working copy: its folder is what reads.
        hint = (f"; name its checkpoint directory, {path.parent}, whose ZeRO partitions are merged into the fp32 "
                "weights" if path.name.endswith(("_model_states.pt", "_optim_states.pt")) else "")
        raise ValueError(f"{path} is not a weights file that torch.load reads with weights_only=True "
                         f"({type(err).__name__}: {said}){hint}") from None


# A timm / Hugging Face model folder's weights beside its config.json, in the order timm looks.
MODEL_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def model_folder_weights(path) -> Optional[Path]:
    """The weights file of a timm model folder (`mto-ds export --folder`'s, or one of timm's
    Hugging Face Hub models downloaded), else None."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    return next((path / name for name in MODEL_FOLDER_WEIGHTS if (path / name).is_file()), None)


def read_weights(path) -> dict:
    """Weights under a MIM model's state_dict names (the encoder's under `encoder.`), from a run or
    checkpoint directory of ours (its newest complete checkpoint: the fp32 masters) or a file:
    an exported encoder or `encoder.state_dict()`, timm's weights (a classifier's head is
    dropped), a whole MIM model's state_dict of ours, a facebookresearch/mae checkpoint (its
    decoder and mask token carry our names; its `decoder_pos_embed`, a fixed table that ours
    rebuilds, is dropped), or any of them under 'model'/'state_dict' or with DDP's `module.`;
    a `.safetensors` file holds any of them too, and so does a timm model folder's."""
    path = model_folder_weights(path) or Path(path)
    if path.is_dir():
        return checkpoint_model_state(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    import torch
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a safetensors file that safetensors reads ({err})") from None
    else:
        state = _torch_load_weights(path)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise ValueError(f"{path} holds no state_dict (names -> tensors), neither at its top nor under "
                         "'model' or 'state_dict'")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole MIM model of ours
        return state
    return {(k if k.startswith(BESIDE_ENCODER) else f"encoder.{k}"): v for k, v in state.items()
            if not k.startswith(("head.", "decoder_pos_embed"))}


def weights_identity(path) -> Optional[Dict[str, object]]:
    """Which weights `read_weights(path)` reads: of a run or checkpoint directory, its newest
    complete checkpoint (tag, step, save time), None when it has none; of a file (a timm model
    folder's too), its path, size and mtime."""
    path = model_folder_weights(path) or Path(path)
    if path.is_dir():
        try:
            tag_dir = newest_complete(path)
        except FileNotFoundError:
            return None
        marker = read_marker(tag_dir)
        return {"tag": tag_dir.name, "step": marker.get("step"), "saved": marker.get("time")}
    stat = path.stat()
    return {"file": str(path.resolve()), "bytes": stat.st_size, "modified": stat.st_mtime}


def fit_pos_embed(state: dict, model) -> Optional[str]:
    """A source's encoder.pos_embed for another grid of patches (another model.img_size) made to
    fit `model` (a MIM model), in `state`: a learned table resampled bicubic, as timm resamples one
    when it loads weights at another size; a fixed one (MAE's sin-cos) replaced by the model's own
    for its grid, exact where resampling is not. Returns what was done, None where nothing was."""
    from timm.layers import resample_abs_pos_embed

    key, encoder = "encoder.pos_embed", model.encoder
    own, theirs = encoder.pos_embed, state.get(key)
    prefix = encoder.num_prefix_tokens
    if theirs is None or theirs.shape == own.shape or theirs.ndim != 3 or theirs.shape[-1] != own.shape[-1]:
        return None  # the same, or not a table of this width: init_keys names what does not fit
    old, new = (round((n - prefix) ** 0.5) for n in (theirs.shape[1], own.shape[1]))
    if old * old + prefix != theirs.shape[1]:
        return None
    if not own.requires_grad:
        state[key] = own.detach().clone()
        return f"encoder.pos_embed for {old}x{old} patches replaced by this model's fixed one for {new}x{new}"
    state[key] = resample_abs_pos_embed(theirs.float(), [new, new], [old, old], num_prefix_tokens=prefix)
    return f"encoder.pos_embed resampled from {old}x{old} to {new}x{new} patches (bicubic)"


def _some(names: List[str], n: int) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def init_keys(own: Dict[str, tuple], source: Dict[str, tuple], name: str) -> Tuple[List[str], str]:
    """Which of a MIM model's weights (`own`: state_dict name -> shape) to take from `source` (the
    same, of what `read_weights` read from `name`), and a line saying what was taken. Every
    encoder weight must be there in its shape (else a ValueError naming what is not); the rest
    (decoder, mask token) is taken only where the source holds all of it in the same shapes (the
    other method's, or another decoder's, would not fit together with a fresh part), else it
    keeps its fresh initialisation. Source weights the model lacks are named, not loaded."""
    encoder = [k for k in own if k.startswith("encoder.")]
    missing = [k for k in encoder if k not in source]
    resized = [f"{k} {list(source[k])} there, {list(own[k])} here" for k in encoder
               if k in source and tuple(source[k]) != tuple(own[k])]
    problems = ([f"{len(missing)} weights missing ({_some(missing, 4)})"] if missing else []) + \
        ([f"{len(resized)} of other shapes ({_some(resized, 3)})"] if resized else [])
    if problems:
        raise ValueError(f"{name} does not fit this run's encoder (model.arch, model.img_size): {'; '.join(problems)}")
    rest = [k for k in own if not k.startswith("encoder.")]
    rest_fits = all(k in source and tuple(source[k]) == tuple(own[k]) for k in rest)
    taken = encoder + (rest if rest_fits else [])
    unused = sorted(set(source) - set(taken))
    return taken, (f"{len(encoder)} encoder weights"
                   + (f" and the {len(rest)} of the decoder and mask token" if rest_fits
                      else "; the decoder and mask token start fresh (not in it in these shapes)")
                   + (f"; not used: {len(unused)} ({_some(unused, 4)})" if unused else ""))


def init_state(model, source) -> Tuple[dict, str]:
    """model.init_from: what of `source`'s weights (`read_weights`) a MIM model takes, its position
    table fitted to the model's grid (`fit_pos_embed`), as `init_keys` decides, with the line that
    says so. Raises FileNotFoundError or ValueError naming what does not fit."""
    state = read_weights(source)
    resized = fit_pos_embed(state, model)
    keys, line = init_keys({k: v.shape for k, v in model.state_dict().items()},
                           {k: v.shape for k, v in state.items()}, str(source))
    return {k: state[k] for k in keys}, line + (f"; {resized}" if resized else "")


def checkpoint_encoder_state(path) -> dict:
    """fp32 encoder weights with timm key names from the newest complete DeepSpeed checkpoint of a
    run directory, a checkpoints directory or a checkpoint directory."""
    return encoder_state(checkpoint_model_state(path))


def checkpoint_model_state(path) -> dict:
    """The whole MIM model's weights (encoder, decoder, mask token: its state_dict's names) from the
    newest complete DeepSpeed checkpoint of a run, checkpoints or checkpoint directory: the trained
    ones fp32 masters, the frozen ones (MAE's sin-cos tables) as the model held them."""
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = newest_complete(path)
    optimizer_files = sorted(tag_dir.glob("*_optim_states.pt"))
    # DeepSpeed's merge prints its progress: onto stderr, so that the stdout of `mto-ds export` or
    # `reconstruct` holds their results only (a script reads them).
    with contextlib.redirect_stdout(sys.stderr):
        if optimizer_files and ZERO_STAGE not in torch.load(optimizer_files[0], map_location="cpu",
                                                            weights_only=False, mmap=True)[OPTIMIZER_STATE_DICT]:
            # DeepSpeed's BF16 optimizer (ZeRO-1 bf16 with fp32 gradient accumulation) records no ZeRO
            # stage: its zero_to_fp32 refuses the layout ("not a zero checkpoint"), ds_to_universal reads it.
            full = _universal_fp32_state(tag_dir)
        else:
            # Merges ZeRO-1/2/3 partitions into the fp32 master weights (not the bf16 working copy).
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # DeepSpeed 0.19 records frozen parameters (MAE's fixed sin-cos pos_embed) for the merge only
    # when it partitions gradients (ZeRO-2/3): under ZeRO-1 the merge leaves them out, while the
    # model-states file holds every parameter in full (ZeRO-3 there: empty placeholders).
    states = tag_dir / "mp_rank_00_model_states.pt"
    if states.is_file():
        module = torch.load(states, map_location="cpu", weights_only=False, mmap=True)["module"]
        full.update({k: v for k, v in module.items() if k not in full and v.numel()})
    return full


def universal_dir(tag_dir: Path) -> Path:
    """Where a checkpoint's conversion to DeepSpeed's universal format goes (engine/checkpoint.py)."""
    return tag_dir.with_name(tag_dir.name + "_universal")


def converted_from(out: Path, tag_dir: Path) -> bool:
    """Whether `out` is a finished universal conversion of this very save of `tag_dir`."""
    return (out / MARKER).is_file() and (out / MARKER).read_bytes() == (tag_dir / MARKER).read_bytes()


def run_module(module: str, args: List[str]) -> subprocess.CompletedProcess:
    """`python -m module args`, its output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


def convert_to_universal(tag_dir: Path, out: Path, run=run_module) -> None:
    """DeepSpeed's ds_to_universal of `tag_dir` into `out`, in a child process started by `run`
    (the trainer's ignores the stop signals); a failure raises with the child's stderr."""
    # Each worker holds a shard or a parameter in memory; half the cores this process may use (a
    # Slurm step's, not the node's as os.cpu_count() says), at most 4.
    workers = str(max(1, min(4, len(os.sched_getaffinity(0)) // 2)))
    result = run("deepspeed.checkpoint.ds_to_universal",
                 ["--input_folder", str(tag_dir), "--output_folder", str(out), "--inject_missing_state",
                  "--num_extract_workers", workers, "--num_merge_workers", workers])
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{result.stderr[-3000:]}")


def _universal_fp32_state(tag_dir: Path) -> dict:
    """The fp32 weights of a checkpoint, read from its universal conversion: the one
    a resume on another world size left beside it, else one made in a temporary directory
    (TMPDIR), never in the run directory, which the reader may not own."""
    import torch

    def read(universal: Path) -> dict:
        return {d.name: torch.load(d / "fp32.pt", map_location="cpu", weights_only=True)["param"]
                for d in (universal / "zero").iterdir() if (d / "fp32.pt").is_file()}

    if converted_from(universal_dir(tag_dir), tag_dir):
        return read(universal_dir(tag_dir))
    with tempfile.TemporaryDirectory(prefix="mto_ds_universal_") as tmp:
        convert_to_universal(tag_dir, Path(tmp) / "out")
        return read(Path(tmp) / "out")


def model_differences(saved: dict, here: dict) -> List[str]:
    """The model.* keys both record with other values: the weights of the one do not fit the other
    (a checkpoint that does not record a key leaves it to the weights' own shapes)."""
    return [key for key in saved if key in here and saved[key] != here[key]]


def saved_model_settings(checkpoint) -> Optional[Tuple[Path, Dict[str, object]]]:
    """(the file that says so, its model.* keys) for the model a run or checkpoint directory was
    pre-trained with: a run directory's config.yaml, else the checkpoint's complete.json (which
    names its model since checkpoints do), else the config.yaml of the run holding it
    (RUN/checkpoints/step_N). None for a file, or where none of them says."""
    path = Path(checkpoint)
    if not path.is_dir():
        return None
    if (path / "config.yaml").is_file():
        return _config_model_keys(path / "config.yaml")
    try:
        tag_dir = newest_complete(path)
    except FileNotFoundError:
        return None
    saved = read_marker(tag_dir).get("model")
    if saved:
        return tag_dir / MARKER, saved
    run_config = tag_dir.parent.parent / "config.yaml"
    return _config_model_keys(run_config) if run_config.is_file() else None


def _config_model_keys(path: Path) -> Tuple[Path, Dict[str, object]]:
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return path, {f"model.{key}": value for key, value in model.items()}
