"""Reading a run's weights without the engine (mto_ds/models/weights.py): which checkpoint is the
newest complete one, which model a run was pre-trained with, and the encoder's keys. Resume, eval
and export all take their checkpoint from here, so a directory set aside or a save that did not
finish must never be taken for a checkpoint."""
import json

import pytest
import torch
import yaml

from mto_ds.models.weights import (MARKER, complete_checkpoints, converted_from, encoder_state, model_differences,
                                   newest_complete, saved_model_settings, universal_dir)


def _save(checkpoints, step, complete=True, model=None):
    tag_dir = checkpoints / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    if complete:
        marker = {"step": step, **({"model": model} if model else {})}
        (tag_dir / MARKER).write_text(json.dumps(marker))
    return tag_dir


def test_complete_checkpoints_are_newest_first_by_step_and_leave_out_unfinished_and_set_aside_saves(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (9, 120, 10):
        _save(checkpoints, step)
    _save(checkpoints, 150, complete=False)  # a save killed midway
    for name in ("step_00000130.damaged", "step_00000140.superseded", "step_00000120_universal"):
        (checkpoints / name).mkdir()
        (checkpoints / name / MARKER).write_text("{}")  # a set-aside save keeps its marker
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_00000120", "step_00000010", "step_00000009"]
    # A complete checkpoint directory is itself the one; an unfinished one holds none.
    assert complete_checkpoints(checkpoints / "step_00000010") == [checkpoints / "step_00000010"]
    assert complete_checkpoints(checkpoints / "step_00000150") == []


def test_newest_complete_takes_a_run_a_checkpoints_folder_or_a_checkpoint_and_names_a_path_without_one(tmp_path):
    run = tmp_path / "run"
    newest = _save(run / "checkpoints", 20)
    _save(run / "checkpoints", 10)
    assert newest_complete(run) == newest_complete(run / "checkpoints") == newest
    assert newest_complete(run / "checkpoints" / "step_00000010") == run / "checkpoints" / "step_00000010"
    _save(tmp_path / "empty" / "checkpoints", 5, complete=False)
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint under {tmp_path / 'empty'}"):
        newest_complete(tmp_path / "empty")


def test_model_differences_name_only_the_keys_both_record_with_other_values():
    saved = {"model.arch": "vit_tiny_patch16", "model.img_size": 64, "model.mask_ratio": 0.6}
    here = {"model.arch": "vit_small_patch16", "model.img_size": 64, "model.drop_path": 0.1}
    assert model_differences(saved, here) == ["model.arch"]
    assert model_differences(saved, {}) == []


def test_the_model_a_run_was_pretrained_with_is_read_from_its_config_else_its_checkpoint_marker(tmp_path):
    run = tmp_path / "run"
    tag_dir = _save(run / "checkpoints", 4, model={"model.arch": "vit_small_patch16"})
    old = _save(run / "checkpoints", 2)  # saved before checkpoints named their model
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "vit_tiny_patch16", "img_size": 64}}))
    by_config = (run / "config.yaml", {"model.arch": "vit_tiny_patch16", "model.img_size": 64})
    assert saved_model_settings(run) == by_config  # the run directory's own config
    assert saved_model_settings(tag_dir) == (tag_dir / MARKER, {"model.arch": "vit_small_patch16"})
    assert saved_model_settings(old) == by_config  # RUN/checkpoints/step_N: its run's config
    assert saved_model_settings(tag_dir / MARKER) is None  # a file: nothing says
    (run / "config.yaml").unlink()
    assert saved_model_settings(old) is None


def test_a_universal_conversion_counts_only_for_the_very_save_it_was_made_from(tmp_path):
    tag_dir = _save(tmp_path / "checkpoints", 8)
    out = universal_dir(tag_dir)
    assert out.name == "step_00000008_universal"
    assert not converted_from(out, tag_dir)  # not made yet
    out.mkdir()
    (out / MARKER).write_bytes((tag_dir / MARKER).read_bytes())
    assert converted_from(out, tag_dir)
    # The step saved again (the next save of a step a resume went back before): another marker.
    (tag_dir / MARKER).write_text(json.dumps({"step": 8, "world_size": 3}))
    assert not converted_from(out, tag_dir)


def test_encoder_state_keeps_the_encoders_tensors_in_fp32_under_timms_names():
    state = {"encoder.blocks.0.attn.qkv.weight": torch.ones(3, 2, dtype=torch.bfloat16),
             "encoder.cls_token": torch.zeros(1, 1, 2).transpose(0, 2),
             "decoder.pred.weight": torch.ones(2), "mask_token": torch.zeros(2)}
    encoder = encoder_state(state)
    assert sorted(encoder) == ["blocks.0.attn.qkv.weight", "cls_token"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in encoder.values())
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], torch.ones(3, 2))
