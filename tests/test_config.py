"""Config validation: bad input fails before any work, naming the key."""
import json
import re

import numpy as np
import pytest

from mto_ds.config import ConfigError, load_config, to_yaml

from conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def test_demo_config_loads_with_overrides_applied():
    cfg = load_config(DEMO, ["train.steps=4", "mto.lambda_e=0.5", "model.method=mae"])
    assert cfg.train.steps == 4 and cfg.mto.lambda_e == 0.5 and cfg.model.method == "mae"
    assert cfg.model.arch == "vit_tiny_patch16"  # from the file, not the schema default


def test_unknown_override_key_names_closest_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.stpes=4"])
    assert "train.stpes" in str(err.value) and "train.steps" in str(err.value)


def test_unknown_key_in_yaml_file_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mto:\n  lambda_spaa: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "mto.lambda_spaa" in str(err.value) and "mto.lambda_spa" in str(err.value)


def test_wrong_type_says_what_was_expected():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.global_batch_size=lots"])
    assert "train.global_batch_size" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("model.arch=vit_giant", "model.arch"),
    ("model.method=beit", "model.method"),
    ("mto.recalibrate=sometimes", "mto.recalibrate"),
    ("mto.kernel=triton", "mto.kernel"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("model.mask_ratio=1.5", "model.mask_ratio"),
    ("model.img_size=100", "model.img_size"),
    ("mto.lambda_r=-1", "mto.lambda_r"),
    ("data.source=ffcv", "data.path"),
    ("data.order=quasi_random", "data.order"),  # the demo's synthetic source has no pages
    ("eval.pooling=max", "eval.pooling"),
    ("eval.finetune_layer_decay=0", "eval.finetune_layer_decay"),
    # Each of these used to pass and fail only later (after DeepSpeed's set-up, at the first
    # step, at the first evaluation) or with a traceback:
    ("model.mask_patch_size=0", "model.mask_patch_size"),
    ("run.log_every=0", "run.log_every"),
    ("train.lr=inf", "train.lr"),
    ("train.blr=inf", "train.blr"),
    ("data.crop_scale_max=1.5", "data.crop_scale_max"),
    ("eval.num_train=-1", "eval.num_train"),
    ("eval.num_val=0", "eval.num_val"),
    # Each at the first value past its bound:
    ("model.drop_path=1.0", "model.drop_path"),
    ("model.mask_patch_size=8", "model.mask_patch_size"),  # not a multiple of the patch (16)
    ("data.source=folder", "data.path"),
    ("data.synthetic_classes=1", "data.synthetic_classes"),
    ("data.crop_scale_max=0", "data.crop_scale_max"),
    ("train.steps=0", "train.steps"),
    ("train.betas=[0.9,1.0]", "train.betas"),
    ("train.clip_grad=0", "train.clip_grad"),
    ("train.warmup_epochs=inf", "train.warmup_epochs"),
    ("run.profile_step=0", "run.profile_step"),
    ("run.profile_steps=0", "run.profile_steps"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("checkpoint.every_minutes=-0.5", "checkpoint.every_minutes"),
    ("checkpoint.every_minutes=nan", "checkpoint.every_minutes"),
    ("checkpoint.keep_every_epochs=-1", "checkpoint.keep_every_epochs"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert f"bad value for '{key}'" in str(err.value)


def test_values_at_their_bounds_are_accepted():
    cfg = load_config(DEMO, ["data.num_workers=0", "train.min_lr_ratio=1.0", "mto.early_blocks=0",
                             "run.profile_step=1", "run.profile_steps=1", "checkpoint.every_minutes=30",
                             "checkpoint.keep_every_epochs=0"])
    assert (cfg.data.num_workers, cfg.train.min_lr_ratio, cfg.mto.early_blocks) == (0, 1.0, 0)
    assert (cfg.checkpoint.every_minutes, cfg.checkpoint.keep_every_epochs) == (30, 0)
    assert (cfg.run.profile_step, cfg.run.profile_steps) == (1, 1)


@pytest.mark.parametrize("overrides, key", [
    (["model.method=mae", "model.mask_patch_size=null", "model.decoder_num_heads=0"], "model.decoder_num_heads"),
    (["data.source=ffcv", "data.path=train.beton", "eval.at_start=true"], "eval.path"),  # eval reads a .beton too
])
def test_bad_values_that_depend_on_other_keys_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(DEMO, overrides)


def test_a_folder_holding_train_and_val_is_refused_as_the_training_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds train/ and val/"):
        load_config(DEMO, ["data.source=folder", f"data.path={tmp_path}"])


def test_a_key_that_is_a_whole_section_or_misspelt_in_both_parts_is_named_with_a_hint():
    with pytest.raises(ConfigError, match="unknown config key 'train'"):
        load_config(DEMO, ["train=5"])
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load_config(DEMO, ["solver.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(DEMO, ["train.batchsize=64"])


@pytest.mark.parametrize("overrides,key,default", [
    # The demo's 64 px image: SimMIM's default 32 px mask patch does not divide 80.
    (["model.img_size=80", "model.mask_patch_size=null"], "model.mask_patch_size", "null means 32"),
    (["model.arch=vit_huge_patch14", "model.img_size=70", "model.mask_patch_size=null"], "model.mask_patch_size",
     "null means 28"),
    # SimMIM's default crop minimum is 0.67: a maximum below it leaves an empty range.
    (["data.crop_scale_max=0.1"], "data.crop_scale_min", "null means simmim's 0.67"),
    (["data.crop_scale_max=0.1", "model.method=mae"], "data.crop_scale_min", "null means mae's 0.2"),
])
def test_a_null_key_whose_default_does_not_fit_the_other_settings_is_named_with_that_default(
        overrides, key, default):
    """A null key stands for the method's default; when that default clashes with a value the
    user set, the error names the key and the default, before any work (it used to fail in a
    data worker or after DeepSpeed's set-up)."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    assert key in str(err.value) and default in str(err.value)
    # MAE has no mask patch: its random mask takes any size that fits the patch.
    assert load_config(DEMO, ["model.img_size=80", "model.mask_patch_size=null", "model.method=mae"]).model.img_size == 80


@pytest.mark.parametrize("overrides,key,masked", [
    (["model.img_size=32", "model.mask_patch_size=32"], "model.mask_patch_size", "1 cells"),  # ceil(0.6 x 1)
    (["model.method=mae", "model.mask_ratio=0.99"], "model.mask_ratio", "masks 16 at"),        # all 16 patches
])
def test_a_mask_that_leaves_nothing_visible_is_refused_naming_the_key(overrides, key, masked):
    """Masks are whole units: a ratio valid on its own can round up to every SimMIM cell or MAE
    patch, leaving nothing but CLS visible, so MIM and recalibration mean nothing."""
    with pytest.raises(ConfigError, match=f"bad value for '{key}'") as err:
        load_config(DEMO, overrides)
    assert masked in str(err.value)


def test_the_realised_mask_ratio_is_the_share_the_mask_generators_mask():
    from mto_ds.config import realised_mask_ratio
    from mto_ds.models import build_mask_fn
    for overrides, ratio in ((["model.mask_patch_size=32"], 0.75), ([], 0.625),  # 3 of 4 cells; 10 of 16
                             (["model.method=mae"], 0.75)):
        model = load_config(DEMO, overrides).model
        mask = build_mask_fn(model.method, model.img_size, 16, model.mask_ratio, model.mask_patch_size)(
            np.random.default_rng(0))
        assert realised_mask_ratio(model) == ratio == mask.mean()
    assert realised_mask_ratio(load_config("configs/vit_l_simmim.yaml").model) == 30 / 49  # SimMIM's 224 px


def test_a_config_file_that_is_not_valid_yaml_or_does_not_resolve_is_a_config_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [4\n")
    with pytest.raises(ConfigError, match="broken.yaml is not a valid YAML config"):
        load_config(broken)
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("train:\n  steps: 4\n  steps: 5\n")
    with pytest.raises(ConfigError, match="duplicate.yaml is not a valid YAML config"):
        load_config(duplicate)
    monkeypatch.delenv("MTO_TEST_UNSET", raising=False)
    env = tmp_path / "env.yaml"
    env.write_text("run:\n  output_dir: ${oc.env:MTO_TEST_UNSET}\n")
    with pytest.raises(ConfigError, match="bad value for 'run.output_dir'.*MTO_TEST_UNSET"):
        load_config(env)


def test_a_deepspeed_file_that_is_not_a_json_object_is_a_config_error(tmp_path):
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object .*not a list"):
        load_config(DEMO, [f"deepspeed.config={listed}"])


@pytest.mark.parametrize("change, named", [
    ({"gradient_clipping": 1.0}, ("leaves gradient_clipping out", "train.clip_grad sets it", "gradient_clipping=1.0")),
    ({"scheduler": {"type": "WarmupLR"}}, ("leaves scheduler out", "train.warmup_epochs", "scheduler={'type'")),
    ({"train_batch_size": 64}, ("leaves train_batch_size out", "train.global_batch_size sets", "train_batch_size=64")),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
     ("leaves optimizer.params.lr out", "train.lr / train.blr", "optimizer.params.lr=0.001")),
])
def test_a_deepspeed_file_setting_what_the_run_sets_is_refused_naming_the_key(tmp_path, change, named):
    """The run fills these in itself: a file's value was replaced without a word (another project's
    "gradient_clipping": 1.0 under MAE's recipe trained unclipped), a scheduler stepped for nothing."""
    ds = {**json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text()), **change}
    (tmp_path / "theirs.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="bad value for 'deepspeed.config'") as err:
        load_config(DEMO, [f"deepspeed.config={tmp_path / 'theirs.json'}"])
    assert all(part in str(err.value) for part in named), str(err.value)


@pytest.mark.parametrize("change, overrides, named", [
    ({"optimizer": None}, (), "a file whose optimizer is an object"),
    ({"optimizer": {"type": "AdamW", "params": None}}, (), "a file whose optimizer.params is an object"),
    ({"zero_optimization": None}, (), "a file whose zero_optimization is an object"),
    ({"zero_optimization": {"stage": "auto"}}, (), "a file whose zero_optimization.stage is 0, 1, 2 or 3"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, (), "a file whose optimizer.type is AdamW (or Adam)"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, ("train.clip_grad=1.0",),
     "bad value for 'train.clip_grad': expected null with zero_optimization.compute_grad_norm=false"),
])
def test_a_deepspeed_file_of_the_wrong_shape_is_refused_before_any_work(tmp_path, change, overrides, named):
    """A null section or a stage of "auto" ended the set-up in an AttributeError or int() traceback;
    a Lamb optimizer silently took AdamW's betas; clipping without the norm it needs failed inside
    DeepSpeed's initialize, naming neither key."""
    ds = {**json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text()), **change}
    (tmp_path / "theirs.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(DEMO, [f"deepspeed.config={tmp_path / 'theirs.json'}", *overrides])
    assert load_config(DEMO, [f"deepspeed.config={tmp_path / 'theirs.json'}", *overrides], training=False)


def test_a_fine_tune_layer_decay_above_one_is_refused():
    with pytest.raises(ConfigError, match=re.escape("'eval.finetune_layer_decay': expected a value in (0, 1], got 7.5")):
        load_config(DEMO, ["eval.finetune_layer_decay=7.5"])
    assert load_config(DEMO, ["eval.finetune_layer_decay=1.0"]).eval.finetune_layer_decay == 1.0


def test_mto_values_given_to_the_python_api_are_checked_as_a_config_is():
    """`create_mim_model(..., mto={...})` took any value: recalibrate='sometimes' silently meant none."""
    from mto_ds.models import create_mim_model
    with pytest.raises(ConfigError, match="'mto.recalibrate': expected one of none, early, all, got 'sometimes'"):
        create_mim_model("vit_tiny_patch16", "simmim", img_size=32, mto={"recalibrate": "sometimes"})
    with pytest.raises(ConfigError, match="mto.lambda_e"):
        create_mim_model("vit_tiny_patch16", "mae", img_size=32, mto={"lambda_e": -0.1})


@pytest.mark.parametrize("key, value", [("early_blocks", 2.0), ("early_blocks", True), ("warmup_steps", 10.5),
                                        ("lambda_r", True), ("enabled", "yes")])
def test_mto_values_of_the_wrong_type_given_to_the_python_api_are_refused_naming_the_key(key, value):
    """A dict skips OmegaConf's type checks: early_blocks=2.0 built a model whose forward failed
    on a float slice index; True counted as 1 and "yes" as on."""
    from mto_ds.models import create_mim_model
    with pytest.raises(ConfigError, match=rf"'mto.{key}': expected .*, got {value!r}"):
        create_mim_model("vit_tiny_patch16", "simmim", img_size=32, mto={key: value})


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["train.steps"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DEMO, ["train.steps=7"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("name", ["vit_b_simmim", "vit_l_simmim", "vit_h_simmim", "vit_b_mae", "vit_l_mae", "vit_h_mae"])
def test_paper_recipe_configs_validate_and_switch_to_baseline_with_one_key(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.mto.enabled
    assert cfg.model.method in name and cfg.train.weight_decay == 0.05
    assert not load_config(REPO / "configs" / f"{name}.yaml", ["mto.enabled=false"]).mto.enabled


def test_compile_with_zero3_fails_naming_train_compile():
    """ZeRO-3's parameter hooks would split the compiled blocks; say so before any work."""
    assert load_config(DEMO, ["train.compile=true"]).train.compile  # ZeRO-2: allowed
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.compile=true", "deepspeed.config=ds_configs/cpu_zero3.json"])
    assert "train.compile" in str(err.value) and "ZeRO stage 3" in str(err.value)


def test_a_shipped_config_loads_by_its_repository_path_from_any_working_directory(tmp_path, monkeypatch):
    """`--config configs/vit_l_simmim.yaml` from a job's own directory, as deepspeed.config=ds_configs/...
    already did; a path that exists where the run starts still wins."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.yaml").model.arch == "vit_tiny_patch16"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("model:\n  arch: vit_small_patch16\n")
    assert load_config("configs/demo.yaml").model.arch == "vit_small_patch16"


def test_a_config_extends_its_base_files_which_the_overrides_then_change(tmp_path):
    """`_base_` (a path relative to the file, or a list merged in order) lets a study's config
    change a few keys of a shipped recipe; the command line's overrides still come last, and the
    resolved config (what the run directory keeps) has no `_base_` left."""
    (tmp_path / "short.yaml").write_text("train:\n  epochs: 100\n  warmup_epochs: 5\n")
    (tmp_path / "study.yaml").write_text(f"_base_: [{REPO / 'configs' / 'vit_l_simmim.yaml'}, short.yaml]\n"
                                         "train:\n  warmup_epochs: 8\n")
    cfg = load_config(tmp_path / "study.yaml", ["run.seed=3"])
    assert (cfg.model.arch, cfg.train.blr, cfg.train.clip_grad) == ("vit_large_patch16", 5e-05, 5.0)  # the recipe
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.run.seed) == (100, 8, 3)  # later layers win
    assert "_base_" not in to_yaml(cfg)
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_a_bad_base_names_the_file_it_comes_from(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: _base_ leads back to .*a.yaml \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml \(the _base_ of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("_base_: {train: 1}\n")
    with pytest.raises(ConfigError, match="d.yaml: bad value for '_base_': expected a path or a list of paths"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("train:\n  epocs: 3\n")  # the typo is in the base: named there
    (tmp_path / "f.yaml").write_text("_base_: e.yaml\n")
    with pytest.raises(ConfigError, match=r"e.yaml: unknown config key 'train.epocs'"):
        load_config(tmp_path / "f.yaml")


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_a_seed_outside_0_to_2_pow_32_fails_naming_run_seed_before_any_work(seed):
    """A negative seed used to load and then crash in numpy ('expected non-negative integer')
    once the model and DeepSpeed were built. The upper bound is numpy's legacy seeding (32 bits),
    which FFCV's quasi_random order uses."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"run.seed={seed}"])
    assert str(err.value) == f"bad value for 'run.seed': expected an integer in [0, 2**32), got {seed}"
    assert load_config(DEMO, [f"run.seed={2 ** 32 - 1}"]).run.seed == 2 ** 32 - 1


def test_a_missing_config_file_names_the_working_directory_and_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("configs/nope.yaml")
    assert str(err.value) == (f"config file not found: configs/nope.yaml (neither {tmp_path / 'configs/nope.yaml'}, "
                              f"relative to the working directory, nor {REPO / 'configs/nope.yaml'}, in the checkout)")


def test_a_value_of_the_wrong_type_names_key_type_and_value_without_omegaconfs_internals(tmp_path):
    """OmegaConf appends `full_key: ... / reference_type=TrainConfig / object_type=TrainConfig`."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.steps=abc"])
    assert str(err.value) == ("override 'train.steps=abc': bad value for 'train.steps': Value 'abc' of type 'str' "
                              "could not be converted to Integer")
    (tmp_path / "bad.yaml").write_text("train:\n  betas: [0.9, high]\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert str(err.value) == (f"{tmp_path / 'bad.yaml'}: bad value for 'train.betas[1]': Value 'high' of type "
                              "'str' could not be converted to Float")


def test_a_data_set_under_one_global_batch_is_a_config_error_naming_the_batch():
    """A data set (files, a .beton, data.synthetic_images) with fewer samples than one global batch:
    a ValueError traceback (exit 1) from the loader, not the one-line config error (exit 2) the
    CLI gives for bad settings."""
    from mto_ds.data.order import steps_per_epoch
    assert steps_per_epoch(64, 32) == 2
    with pytest.raises(ConfigError, match="bad value for 'train.global_batch_size': the data set has 10 samples, "
                                          "fewer than one global batch of 32"):
        steps_per_epoch(10, 32)


def test_evaluation_loads_a_config_whose_deepspeed_json_is_gone_and_pretraining_refuses_it(tmp_path):
    """Only pre-training reads the DeepSpeed JSON: a run trained with a file of its own, since
    moved or deleted, must still be evaluated (`mto-ds eval`, a study's --final-eval), while a
    pre-training start names the missing file before any work."""
    ds = tmp_path / "ds.json"
    ds.write_text((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    override = [f"deepspeed.config={ds}"]
    assert load_config(DEMO, override).deepspeed.config == str(ds)
    ds.unlink()
    with pytest.raises(ConfigError, match="'deepspeed.config': expected an existing DeepSpeed .json file"):
        load_config(DEMO, override)
    assert load_config(DEMO, override, training=False).deepspeed.config == str(ds)
    with pytest.raises(ConfigError, match="eval.knn_k"):  # the rest is still checked
        load_config(DEMO, [*override, "eval.knn_k=0"], training=False)


def test_a_simmim_run_left_with_maes_optimizer_defaults_is_told_so():
    """The schema's optimizer defaults are MAE's recipe (betas 0.95, blr 1.5e-4, no clipping): a
    hand-written SimMIM config that leaves them out trained with MAE's optimizer, unsaid."""
    from mto_ds.config import other_method_defaults
    assert other_method_defaults(load_config(DEMO)) == []  # SimMIM with its own blr and clipping
    (message,) = other_method_defaults(load_config(DEMO, ["train.blr=1.5e-4", "train.clip_grad=null"]))
    assert message.startswith("train.betas, train.clip_grad and train.blr are the schema's defaults, MAE's recipe "
                              "(betas [0.9, 0.95], blr 0.00015, no clipping), in a SimMIM run; SimMIM's")
    (message,) = other_method_defaults(load_config(DEMO, ["train.lr=1e-3", "train.clip_grad=null"]))
    assert message.startswith("train.betas and train.clip_grad are")  # an absolute LR: blr is not read
    (message,) = other_method_defaults(load_config(DEMO, ["train.blr=1.5e-4", "train.lr=1e-3", "train.clip_grad=null"]))
    assert message.startswith("train.betas and train.clip_grad are")  # blr at MAE's value, but unread
    assert other_method_defaults(load_config(DEMO, ["train.clip_grad=null", "model.method=mae",
                                                    "model.mask_patch_size=null"])) == []
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        assert other_method_defaults(load_config(recipe)) == [], recipe


def test_keys_the_method_or_data_source_never_reads_are_named_when_set():
    """A config switched from SimMIM to MAE keeps its mask cell, a SimMIM run given MAE's decoder
    settings, a folder run given FFCV's page-cache switch, a synthetic smoke test given a .beton:
    accepted (one file can serve both methods) and said at start, each with why, instead of
    silently doing nothing."""
    from mto_ds.config import unread_keys
    assert unread_keys(load_config(DEMO)) == []  # SimMIM with its mask cell
    assert unread_keys(load_config(DEMO, ["model.method=mae"])) == [
        "model.mask_patch_size=16 is not read: MAE masks single patches (it is SimMIM's mask cell)"]
    assert unread_keys(load_config(DEMO, ["model.method=mae", "model.mask_patch_size=null",
                                          "model.decoder_depth=2"])) == []
    named = unread_keys(load_config(DEMO, ["model.decoder_depth=2", "model.norm_pix_loss=false",
                                           "data.os_cache=false", "data.path=x.beton"]))
    assert [problem.split(" ")[0] for problem in named] == [
        "model.decoder_depth=2", "model.norm_pix_loss=False", "data.path=x.beton", "data.os_cache=False"]
    assert "is not read: it is MAE's; SimMIM predicts the pixels with one linear layer" in named[0]
    assert named[2].startswith("data.path=x.beton is not read: data.source=synthetic trains on 1024 generated images")
    assert named[3] == "data.os_cache=False is not read: it is FFCV's, and data.source=synthetic"
    assert unread_keys(load_config(DEMO, ["data.source=ffcv", "data.path=x.beton", "data.os_cache=false"])) == []
    # Reconstructions are drawn by the evaluations during pre-training: asked for without one, said.
    assert unread_keys(load_config(DEMO, ["eval.reconstructions=16"])) == [
        "eval.reconstructions=16 is not read: the evaluations during pre-training draw them, and this run has "
        "none (eval.every_epochs=0, eval.at_start=false); `mto-ds reconstruct` draws them from a checkpoint"]
    assert unread_keys(load_config(DEMO, ["eval.reconstructions=16", "eval.every_epochs=1"])) == []
    assert unread_keys(load_config(DEMO, ["eval.reconstructions=16", "eval.at_start=true"])) == []
    # Which blocks activation checkpointing recomputes, in a run that recomputes none.
    assert unread_keys(load_config(DEMO, ["train.checkpoint_every=2"])) == [
        "train.checkpoint_every=2 is not read: it says which blocks train.activation_checkpointing recomputes, "
        "and that is false"]
    assert unread_keys(load_config(DEMO, ["train.checkpoint_every=2", "train.activation_checkpointing=true"])) == []
