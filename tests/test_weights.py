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


def _shapes(state):
    return {k: v.shape for k, v in state.items()}


def test_read_weights_gives_a_facebookresearch_mae_checkpoint_our_mae_models_names(tmp_path):
    """main_pretrain.py's file holds the encoder's keys without a prefix beside the decoder's (which
    are ours), `decoder_pos_embed` (a fixed table ours rebuilds, not in its state_dict) and its
    arguments as an argparse.Namespace: read, it loads into our MAE with strict=True."""
    import argparse
    from mto_ds.models import create_mim_model
    from mto_ds.models.weights import read_weights, weights_identity
    torch.manual_seed(3)
    mae = create_mim_model("vit_tiny_patch16", "mae", img_size=32, decoder_embed_dim=64, decoder_depth=1,
                           decoder_num_heads=2)
    reference = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}
    reference["decoder_pos_embed"] = torch.zeros(1, 5, 64)
    torch.save({"model": reference, "args": argparse.Namespace(model="mae_vit_tiny")}, tmp_path / "checkpoint-3.pth")
    state = read_weights(tmp_path / "checkpoint-3.pth")
    assert set(state) == set(mae.state_dict())
    fresh = create_mim_model("vit_tiny_patch16", "mae", img_size=32, decoder_embed_dim=64, decoder_depth=1,
                             decoder_num_heads=2)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in fresh.state_dict().items())
    # DDP's module. prefix and a timm classifier's head: stripped and dropped.
    timm_file = {f"module.{k.removeprefix('encoder.')}": v for k, v in mae.encoder.state_dict().items()}
    torch.save({"state_dict": {**timm_file, "module.head.weight": torch.zeros(10, 192)}}, tmp_path / "timm.pt")
    assert set(read_weights(tmp_path / "timm.pt")) == {f"encoder.{k}" for k in mae.encoder.state_dict()}
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*gone.pt"):
        read_weights(tmp_path / "gone.pt")
    # What is not weights is named as such (mto-ds eval and model.init_from exit 2 with it), in one
    # line: torch's own message runs to a paragraph that suggests weights_only=False.
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "ok.pt")
    for name, said in [("notes.txt", "(UnpicklingError: Weights only load failed)"),
                       ("empty.pt", "(EOFError: the file ends early)")]:
        with pytest.raises(ValueError) as err:
            read_weights(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} is not a weights file that torch.load reads with " \
                                 f"weights_only=True {said}"
    # A file of one of our (DeepSpeed's) checkpoints: its directory is what holds the whole weights.
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match=f"; name its checkpoint directory, {tag_dir}, whose ZeRO partitions are "
                                         "merged into the fp32 weights$"):
        read_weights(tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"list.pt holds no state_dict \(names -> tensors\), neither at its top nor"):
        read_weights(tmp_path / "list.pt")
    assert set(read_weights(tmp_path / "ok.pt")) == {"encoder.w"}
    # safetensors (no pickle): a timm file in that format is read as the .pt one; one that is not
    # safetensors is named in one line.
    from safetensors.torch import save_file
    save_file({k.removeprefix("module."): v.contiguous() for k, v in timm_file.items()}, tmp_path / "timm.safetensors")
    from_safetensors, from_pt = read_weights(tmp_path / "timm.safetensors"), read_weights(tmp_path / "timm.pt")
    assert set(from_safetensors) == set(from_pt)
    assert all(torch.equal(v, from_pt[k]) for k, v in from_safetensors.items())
    # A timm model folder (export --folder's, a Hub model downloaded): its weights file beside config.json.
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    (tmp_path / "timm.safetensors").rename(tmp_path / "hub" / "model.safetensors")
    from_folder = read_weights(tmp_path / "hub")
    assert set(from_folder) == set(from_pt) and all(torch.equal(v, from_pt[k]) for k, v in from_folder.items())
    assert weights_identity(tmp_path / "hub")["file"] == str((tmp_path / "hub" / "model.safetensors").resolve())
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path / "text.safetensors")
    assert str(err.value) == f"{tmp_path / 'text.safetensors'} is not a safetensors file that safetensors reads " \
                             "(Error while deserializing header: header too large)"  # its first 8 bytes


def test_init_keys_take_the_whole_encoder_and_the_rest_only_where_all_of_it_fits():
    """model.init_from: a SimMIM model begun from an MAE's weights takes the encoder and keeps its
    own fresh decoder and mask token (MAE's mask token is of the decoder's width, its decoder
    another module); an MAE from an MAE of the same decoder takes everything."""
    from mto_ds.models import create_mim_model
    from mto_ds.models.weights import init_keys
    small = {"decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2}
    simmim = _shapes(create_mim_model("vit_tiny_patch16", "simmim", img_size=32).state_dict())
    mae = _shapes(create_mim_model("vit_tiny_patch16", "mae", img_size=32, **small).state_dict())
    encoder = [k for k in simmim if k.startswith("encoder.")]
    taken, line = init_keys(simmim, mae, "mae.pt")
    assert taken == encoder and len(encoder) == 4 + 12 * 12 + 2  # patch embed, cls, pos, 12 blocks, norm
    mae_only = sorted(k for k in mae if not k.startswith("encoder."))
    assert line == (f"{len(encoder)} encoder weights; the decoder and mask token start fresh (not in it in these "
                    f"shapes); not used: {len(mae_only)} ({', '.join(mae_only[:4])}, ...)")
    taken, line = init_keys(mae, mae, "mae.pt")
    assert sorted(taken) == sorted(mae) and line == f"{len(encoder)} encoder weights and the {len(mae_only)} " \
                                                    "of the decoder and mask token"
    # Another decoder width: the mask token alone would fit nothing, so none of the rest is taken.
    wider = _shapes(create_mim_model("vit_tiny_patch16", "mae", img_size=32, **{**small, "decoder_embed_dim": 32})
                    .state_dict())
    assert init_keys(mae, wider, "wide.pt")[0] == encoder


def test_init_keys_name_encoder_weights_missing_or_of_another_shape():
    from mto_ds.models import create_mim_model
    from mto_ds.models.weights import init_keys
    at32 = _shapes(create_mim_model("vit_tiny_patch16", "simmim", img_size=32).state_dict())
    at64 = _shapes(create_mim_model("vit_tiny_patch16", "simmim", img_size=64).state_dict())
    with pytest.raises(ValueError) as err:
        init_keys(at32, at64, "at64.pt")
    assert str(err.value) == ("at64.pt does not fit this run's encoder (model.arch, model.img_size): 1 of other "
                              "shapes (encoder.pos_embed [1, 17, 192] there, [1, 5, 192] here)")
    partial = {k: v for k, v in at32.items() if not k.startswith("encoder.blocks.11.")}
    with pytest.raises(ValueError) as err:
        init_keys(at32, partial, "at32.pt")
    assert str(err.value).endswith(": 12 weights missing (encoder.blocks.11.norm1.weight, "
                                   "encoder.blocks.11.norm1.bias, encoder.blocks.11.attn.qkv.weight, "
                                   "encoder.blocks.11.attn.qkv.bias, ...)")


def test_a_position_table_of_another_grid_is_resampled_when_learned_and_rebuilt_when_fixed():
    """model.init_from at another model.img_size: SimMIM's learned pos_embed is resampled bicubic
    (timm's resample_abs_pos_embed, CLS row kept); MAE's fixed sin-cos one is the model's own for
    its grid, which resampling would only approximate. Then every encoder weight fits."""
    from timm.layers import resample_abs_pos_embed
    from mto_ds.models import create_mim_model
    from mto_ds.models.weights import fit_pos_embed, init_keys
    torch.manual_seed(0)
    at64 = create_mim_model("vit_tiny_patch16", "simmim", img_size=64).state_dict()
    at32 = create_mim_model("vit_tiny_patch16", "simmim", img_size=32)
    state = dict(at64)
    assert fit_pos_embed(state, at32) == "encoder.pos_embed resampled from 4x4 to 2x2 patches (bicubic)"
    expected = resample_abs_pos_embed(at64["encoder.pos_embed"], [2, 2], [4, 4], num_prefix_tokens=1)
    assert torch.equal(state["encoder.pos_embed"], expected) and state["encoder.pos_embed"].shape == (1, 5, 192)
    assert torch.equal(state["encoder.pos_embed"][:, 0], at64["encoder.pos_embed"][:, 0])  # CLS's row as it was
    taken, _ = init_keys(_shapes(at32.state_dict()), _shapes(state), "at64")
    assert sorted(taken) == sorted(at32.state_dict())  # SimMIM's decoder and mask token: the same at any size
    small = {"decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2}
    mae64 = create_mim_model("vit_tiny_patch16", "mae", img_size=64, **small).state_dict()
    mae32 = create_mim_model("vit_tiny_patch16", "mae", img_size=32, **small)
    state = dict(mae64)
    assert fit_pos_embed(state, mae32) == ("encoder.pos_embed for 4x4 patches replaced by this model's fixed one "
                                           "for 2x2")
    assert torch.equal(state["encoder.pos_embed"], mae32.encoder.pos_embed)
    assert fit_pos_embed(state, mae32) is None  # nothing left to fit
    # Another width is not a grid to fit: left for init_keys to name.
    wide = {"encoder.pos_embed": torch.zeros(1, 17, 384)}
    assert fit_pos_embed(wide, at32) is None and wide["encoder.pos_embed"].shape == (1, 17, 384)
