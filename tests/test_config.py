"""Config validation: bad input fails before any work, naming the key."""
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
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert key in str(err.value)


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
