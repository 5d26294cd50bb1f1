"""The CLI's errors: bad input fails before any work, with the key named; export for timm;
reconstruct on a run's checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mto_ds.cli import main
from mto_ds.config import load_config
from mto_ds.data import normalize
from mto_ds.eval.datasets import held_out_images
from mto_ds.data.loader import batch_masks
from mto_ds.models import build_mim_model, create_encoder
from mto_ds.engine.checkpoint import file_sizes
from mto_ds.models.weights import checkpoint_model_state

from conftest import HALF_PRECISION_SMALL, REPO, SMALL_MAE_DECODER_OVERRIDES, cpu_env, free_port, pretrain


def _cli(*args, python_options=()):
    """`python PYTHON_OPTIONS -m mto_ds ARGS`."""
    return subprocess.run([sys.executable, *python_options, "-m", "mto_ds", *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)


def test_unknown_key_fails_before_any_work(tmp_path):
    run = tmp_path / "run"
    result = _cli("pretrain", "--config", "configs/demo.yaml", f"run.output_dir={run}", "train.batchsize=8")
    assert result.returncode == 2
    assert "unknown config key 'train.batchsize'" in result.stderr and "train.global_batch_size" in result.stderr
    assert not run.exists()


def test_missing_config_file_and_missing_deepspeed_json_are_named(tmp_path):
    result = _cli("pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = _cli("pretrain", "--config", "configs/demo.yaml", "deepspeed.config=ds_configs/zero9.json")
    assert result.returncode == 2 and "deepspeed.config" in result.stderr


def test_fused_mto_kernel_without_a_gpu_is_a_config_error_naming_the_key(tmp_path):
    # With MTO off too: the baseline's telemetry takes the same kernel (it failed at the first logged step).
    for mto_enabled in ("true", "false"):
        result = pretrain(tmp_path / "run", "mto.kernel=fused", f"mto.enabled={mto_enabled}", check=False)
        assert result.returncode == 2 and "mto.kernel" in result.stderr and "CUDA" in result.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()


def _imports_torch(result) -> bool:
    """Whether a process run with `-X importtime` imported torch (its lines are in stderr)."""
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in result.stderr.splitlines())


RUN_DIR_TAKEN_AFTER_THE_CONFIG = r"""
import sys
from pathlib import Path
from mto_ds.config import load_config
from mto_ds.engine.trainer import Trainer
cfg = load_config("configs/demo.yaml", [f"run.output_dir={sys.argv[1]}", "train.steps=1"])
Path(sys.argv[1]).write_text("made a file between the config's check and the start")
Trainer(cfg)
"""


def test_a_run_directory_that_cannot_be_made_is_a_config_error_naming_it(tmp_path):
    """Named by the config's check, before torch's imports (a start and its dry run), and by the
    start itself when the path became unusable after that check (then on every rank)."""
    taken = tmp_path / "afile"
    taken.write_text("not a directory")
    for output_dir, dry_run in ((taken, ()), (taken / "sub", ()), (taken / "sub", ("--dry-run",))):
        result = _cli("pretrain", "--config", "configs/demo.yaml", f"run.output_dir={output_dir}", *dry_run,
                      python_options=("-X", "importtime"))
        assert result.returncode == 2, result.stderr[-3000:]
        message = f"mto-ds: config error: bad value for 'run.output_dir': {output_dir} cannot be made or written"
        assert message in result.stderr and f"({taken} is not a directory)" in result.stderr
        assert not _imports_torch(result)
    assert taken.read_text() == "not a directory"
    made_late = tmp_path / "made_late"
    result = subprocess.run([sys.executable, "-c", RUN_DIR_TAKEN_AFTER_THE_CONFIG, str(made_late)], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True)
    assert f"ConfigError: bad value for 'run.output_dir': {made_late} cannot be made or written" in result.stderr
    assert made_late.read_text().startswith("made a file")


def test_version_names_the_package_and_the_checkouts_commit_without_importing_torch():
    result = _cli("--version", python_options=("-X", "importtime"))
    assert result.returncode == 0 and not _imports_torch(result), result.stderr[-2000:]
    from mto_ds import __version__
    from mto_ds.engine.provenance import code_version
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if (REPO / ".git").exists() and commit.returncode == 0:
        dirty = ", uncommitted changes" if code_version()["dirty"] else ""
        assert result.stdout == f"mto-ds {__version__} (git {commit.stdout.strip()[:10]}{dirty})\n"
    else:  # a source archive
        assert result.stdout == f"mto-ds {__version__} (not a git checkout)\n"


def test_eval_and_export_name_a_missing_checkpoint_or_folder_with_exit_2_not_a_traceback(tmp_path):
    """Named at once: before torch's seconds of imports (on a login node, or each rank of a job)."""
    missing = tmp_path / "no-run"
    result = _cli("eval", "--config", "configs/demo.yaml", "--checkpoint", str(missing),
                  python_options=("-X", "importtime"))
    assert result.returncode == 2 and f"checkpoint not found: {missing}" in result.stderr
    assert "Traceback" not in result.stderr and not _imports_torch(result)
    # Evaluation never reads the DeepSpeed JSON: one that is gone is not what stops it.
    gone = tmp_path / "gone.json"
    result = _cli("eval", "--config", "configs/demo.yaml", f"deepspeed.config={gone}", "--checkpoint", str(missing))
    assert result.returncode == 2 and f"checkpoint not found: {missing}" in result.stderr, result.stderr
    result = _cli("export", str(missing), str(tmp_path / "encoder.pt"), python_options=("-X", "importtime"))
    assert result.returncode == 2 and f"{missing} does not exist (export reads a run directory" in result.stderr
    assert "Traceback" not in result.stderr and not _imports_torch(result)
    assert not (tmp_path / "encoder.pt").exists()


def test_the_readmes_deepspeed_launcher_command_trains(tiny_run):
    """`deepspeed --module mto_ds pretrain ...` runs `python -m mto_ds --local_rank=0 pretrain ...`:
    the flag comes before the command, which the CLI refused ("unrecognized arguments"). tiny_run
    is trained by that command (conftest.py), which must have exited 0."""
    assert "--local_rank=0" in (tiny_run.parent / "launcher_output.txt").read_text()  # the launcher did pass it
    assert (tiny_run / "checkpoints" / "step_00000002" / "complete.json").is_file()
    assert json.loads((tiny_run / "state.json").read_text())["reason"] == "completed"


MAE = ("model.method=mae", "model.mask_patch_size=null", *SMALL_MAE_DECODER_OVERRIDES)


@pytest.mark.parametrize("case", ["simmim_zero2", "mae_zero1", "mae_bf16_optimizer"])
def test_exported_encoder_loads_into_timm_without_missing_keys(tmp_path, case, request):
    """Every parameter reaches the file, the frozen ones included: under ZeRO-1 DeepSpeed's fp32
    merge leaves out MAE's fixed sin-cos pos_embed (it records frozen parameters only when it
    partitions gradients), and the checkpoints of its BF16 optimizer (ZeRO-1 bf16 with fp32
    gradient accumulation) it refuses to merge at all; those weights come from the universal
    format, fp32 masters and not the bf16 working copy (trained at 32 px: bf16 on this CPU is slow)."""
    img_size = 64
    if case == "simmim_zero2":  # the demo's own 2-step run (SimMIM, ZeRO-2), shared with the tests below
        run = request.getfixturevalue("tiny_run")
    else:
        run = tmp_path / "run"
        overrides = (*MAE, "deepspeed.config=ds_configs/cpu_zero1.json")
        if case == "mae_bf16_optimizer":
            ds = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
            (tmp_path / "ds.json").write_text(json.dumps({**ds, "data_types": {"grad_accum_dtype": "fp32"}}))
            overrides = (*MAE, f"deepspeed.config={tmp_path / 'ds.json'}", *HALF_PRECISION_SMALL)
            img_size = 32
        pretrain(run, "train.steps=2", *overrides)
    out = tmp_path / "encoder.pt"
    if case == "simmim_zero2":  # the tool as users run it; the others in this process (seconds of imports less)
        result = subprocess.run([sys.executable, "tools/export_encoder.py", str(run), str(out)], cwd=REPO,
                                env=cpu_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        from mto_ds.engine.export import export_encoder
        export_encoder(run, out)
    state = torch.load(out, weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size)
    missing = model.load_state_dict(state, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    loaded = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, checkpoint_path=str(out))
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    if case == "simmim_zero2":
        # What timm's train.py does with `--pretrained --pretrained-path OUT --num-classes N` (README's
        # fine-tuning recipe, MAE's global average pooling): the encoder loaded, a new head of N classes.
        classifier = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=img_size,
                                       global_pool="avg", pretrained_cfg_overlay=dict(file=str(out), num_classes=-1))
        torch.testing.assert_close(classifier.blocks[-1].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])
        torch.testing.assert_close(classifier.patch_embed.proj.weight, state["patch_embed.proj.weight"])
        assert classifier.head.out_features == 10
    (states,) = (run / "checkpoints" / "step_00000002").glob("mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    if case != "simmim_zero2":  # the frozen sin-cos table the model trained with
        assert torch.equal(state["pos_embed"], module["encoder.pos_embed"].float())
    if case == "mae_bf16_optimizer":  # fp32 masters: their bf16 rounding is the module's working copy
        qkv = state["blocks.0.attn.qkv.weight"]
        assert state["blocks.0.attn.qkv.weight"].dtype == torch.float32
        assert torch.equal(qkv.bfloat16(), module["encoder.blocks.0.attn.qkv.weight"])
        assert not torch.equal(qkv, module["encoder.blocks.0.attn.qkv.weight"].float())
    else:  # the whole model (decoder, mask token) for reconstruct: strict, so no tensor is left out
        # (not for the BF16 optimizer's checkpoint: a second universal conversion, seconds, of the same reader)
        model, _ = build_mim_model(load_config(run / "config.yaml", training=False))
        model.load_state_dict(checkpoint_model_state(run), strict=True)
        torch.testing.assert_close(model.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_every_python_tool_runs_from_a_checkout_without_installing():
    # `python -S` with only site-packages on the path skips the editable install's .pth, as on a
    # machine where the checkout was never installed: mto_ds is found only through the tool's own
    # path entry for the checkout. export_encoder, epoch_study and plan_run lacked it.
    # The tools that prepare data, plan or collect need no torch to say how they are used (a
    # login node answers --help in under a second, not the ~5 s torch takes to import there).
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**cpu_env(), "PYTHONPATH": site_packages}
    failed, loads_torch = {}, set()
    for tool in sorted((REPO / "tools").glob("*.py")):
        result = subprocess.run([sys.executable, "-S", "-X", "importtime", str(tool), "--help"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or "usage:" not in result.stdout:
            failed[tool.name] = result.stderr[-300:]
        if _imports_torch(result):
            loads_torch.add(tool.name)
    assert failed == {}
    assert loads_torch == {"bench_attention.py", "bench_step.py"}  # GPU benchmarks, torch at the top


def test_a_config_error_exits_2_with_the_process_group_destroyed_even_when_terminated_while_exiting(tmp_path):
    # Left to the interpreter's exit, gloo's teardown sometimes aborts ("terminate called without
    # an active exception"): the rank exits 134 instead of 2, and a Slurm job can then not tell a
    # config error (never requeued: a duplicate start on a live run directory) from a crash.
    # Nor may the TERM that srun --kill-on-bad-exit sends the other ranks once one has exited kill
    # a rank in Python's exit, where its handler is the default again (exit 143, seen once in the
    # duplicate-sbatch test): from the error on, the rank ignores TERM and USR1.
    script = f"""
import os
import subprocess
import sys
import time
import torch.distributed as dist
from mto_ds import cli
from mto_ds.config import ConfigError
from mto_ds.engine import trainer

class Refused:
    def __init__(self, cfg, stop=None):
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        raise ConfigError("run.output_dir=x is in use by another start")

MARKER = "{tmp_path / 'term-sent'}"

class SlowToDelete:  # a module global, deleted late in Python's exit, as torch's state is
    def __del__(self):  # until the TERM was sent (however late bash started), and a little after
        deadline = time.monotonic() + 60
        while not os.path.exists(MARKER) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

trainer.Trainer = Refused
code = cli.main(["pretrain", "--config", "configs/demo.yaml"])
print("exit", code, "group left up", dist.is_initialized(), flush=True)
slow = SlowToDelete()
# srun's TERM to a rank still exiting, here in the middle of its exit:
subprocess.Popen(["bash", "-c", f"sleep 0.7; touch {{MARKER}}; kill -TERM {{os.getpid()}}"])
sys.exit(code)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cpu_env(), capture_output=True,
                            text=True, timeout=300)
    assert "config error: run.output_dir=x is in use by another start" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "exit 2 group left up False"
    assert result.returncode == 2, result.stderr[-3000:]  # not 143: the TERM is ignored
    assert (tmp_path / "term-sent").exists()  # the TERM came while the process was exiting


def test_a_missing_data_path_or_resume_checkpoint_is_a_config_error_before_the_model_is_built(tmp_path):
    """data.path and checkpoint.resume name files a start reads: missing, they are config errors
    (exit 2, which a Slurm job never requeues), named, without a traceback, and found before the
    model is built (a ViT-H takes a while): the model builder here raises if it is reached.
    Class folders without an image show only when the loader lists them, after the model.
    So does a key of the DeepSpeed file that DeepSpeed does not know: found by DeepSpeed's own
    validation before the model, where deepspeed.initialize raised it after, with exit 1."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not images")
    misspelt = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    misspelt["zero_optimization"]["overlap_com"] = True
    (tmp_path / "misspelt.json").write_text(json.dumps(misspelt))
    cases = {
        "folder_missing": ["data.source=folder", f"data.path={tmp_path / 'no-images'}"],
        "folder_is_a_file": ["data.source=folder", f"data.path={tmp_path / 'notes.txt'}"],
        "folder_without_classes": ["data.source=folder", f"data.path={tmp_path / 'empty'}"],
        "ffcv_missing": ["data.source=ffcv", f"data.path={tmp_path / 'train.beton'}"],
        "resume_missing": [f"checkpoint.resume={tmp_path / 'no-run'}"],
        "deepspeed_key_misspelt": [f"deepspeed.config={tmp_path / 'misspelt.json'}"],
        "folder_without_images": ["data.source=folder", f"data.path={tmp_path / 'no-images-inside'}"],
    }
    (tmp_path / "no-images-inside" / "class_a").mkdir(parents=True)
    (tmp_path / "no-images-inside" / "class_a" / "notes.txt").write_text("not an image")
    # state.json is each start's own: one that fails in set-up must not leave an earlier start's
    # "signal SIGUSR1" (not finished, checkpointed) for the scheduler to read.
    (tmp_path / "resume_missing").mkdir()
    (tmp_path / "resume_missing" / "state.json").write_text(json.dumps(
        {"finished": False, "step": 6, "total_steps": 12, "reason": "signal SIGUSR1"}))
    script = f"""
import json, sys
from mto_ds import cli
from mto_ds.engine import trainer

def never(*args, **kwargs):
    raise AssertionError("the model was built before the inputs were checked")

built = trainer.build_mim_model
for name, overrides in json.loads(sys.argv[1]).items():
    # Class folders without an image are found only by listing them, after the model is built.
    trainer.build_mim_model = built if name == "folder_without_images" else never
    code = cli.main(["pretrain", "--config", "configs/demo.yaml", "run.output_dir={tmp_path}/" + name, *overrides])
    print("case", name, code, flush=True)
    print("end", name, file=sys.stderr, flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outcomes = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("case ")]
    assert outcomes == [[name, "2"] for name in cases]
    errors = dict(zip(cases, result.stderr.split("\nend ")))
    assert f"config error: bad value for 'data.path': data.path={tmp_path / 'no-images'}: not found" \
        in errors["folder_missing"]
    assert "notes.txt: a file, not a folder" in errors["folder_is_a_file"]
    assert "empty has no class folders" in errors["folder_without_classes"]
    assert "train.beton: not found (data.source=ffcv reads a .beton" in errors["ffcv_missing"]
    assert f"config error: bad value for 'checkpoint.resume': {tmp_path / 'no-run'} holds no complete" \
        in errors["resume_missing"]
    assert "config error: bad value for 'data.path': no image files under the class folders of" \
        in errors["folder_without_images"]
    assert (f"config error: bad value for 'deepspeed.config': DeepSpeed refuses {tmp_path / 'misspelt.json'}: "
            "ValidationError: 1 validation error for DeepSpeedZeroConfig overlap_com Extra inputs are not permitted"
            in errors["deepspeed_key_misspelt"])
    assert json.loads((tmp_path / "resume_missing" / "state.json").read_text()) == {
        "finished": False, "step": None, "total_steps": None,
        "reason": f"set-up failed: ConfigError: bad value for 'checkpoint.resume': {tmp_path / 'no-run'} holds no "
                  f"complete checkpoint (a directory with complete.json, or a checkpoints/ folder holding some)"}


def test_overrides_on_both_sides_of_config_are_all_applied_in_order():
    """argparse takes one run of positional words: `pretrain a=1 --config c.yaml b=2` left b=2
    "unrecognized". Both runs are overrides, in the order given (a later one wins)."""
    from mto_ds.cli import _parse
    args = _parse(["pretrain", "train.steps=9", "--config", "configs/demo.yaml", "run.output_dir=r", "train.steps=5"])
    assert (args.config, args.overrides) == ("configs/demo.yaml", ["train.steps=9", "run.output_dir=r", "train.steps=5"])
    from mto_ds.config import load_config
    assert load_config(REPO / args.config, args.overrides).train.steps == 5
    args = _parse(["eval", "eval.k=5", "--config", "c.yaml", "--checkpoint", "run", "eval.num_train=64"])
    assert (args.checkpoint, args.overrides) == ("run", ["eval.k=5", "eval.num_train=64"])
    for argv in (["pretrain", "--config", "c.yaml", "a=1", "--bogus"], ["export", "run", "out.pt", "extra"]):
        with pytest.raises(SystemExit) as exit_:
            _parse(argv)
        assert exit_.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--config", "a.yaml", "--config", "b.yaml"], "--config given twice (a.yaml, b.yaml): give one"),
    (["eval", "--config", "c.yaml", "--checkpoint", "r1", "--checkpoint", "r2"], "--checkpoint given twice (r1, r2)"),
    (["eval", "--config", "c.yaml", "--checkpoint", "r", "--finetune-epochs", "-5"], "-5 is negative"),
])
def test_a_repeated_option_or_a_negative_epoch_count_is_refused_not_silently_replaced(argv, message, capsys):
    """argparse kept the last of two --config (the first file dropped unseen: a user may expect
    them merged) and took --finetune-epochs -5 as 0."""
    from mto_ds.cli import _parse
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def _one_line_error(result, code=2):
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr


def test_eval_of_a_run_pretrained_with_another_model_names_the_keys_not_every_tensors_size(tiny_run):
    """Was a 177-line traceback of torch's `size mismatch for ...`, exit 1."""
    err = _one_line_error(_cli("eval", "--config", "configs/demo.yaml", "--checkpoint", str(tiny_run),
                               "model.arch=vit_small_patch16", "model.img_size=32"))
    assert "config error:" in err and "size mismatch" not in err
    assert f"model.arch: vit_tiny_patch16 in {tiny_run / 'config.yaml'}, vit_small_patch16 here" in err
    assert f"model.img_size: 64 in {tiny_run / 'config.yaml'}, 32 here" in err
    # A checkpoint directory says what it holds in its complete.json.
    tag_dir = tiny_run / "checkpoints" / "step_00000002"
    err = _one_line_error(_cli("eval", "--config", "configs/demo.yaml", "--checkpoint", str(tag_dir),
                               "model.img_size=32"))
    assert f"model.img_size: 64 in {tag_dir / 'complete.json'}, 32 here" in err and "model.arch" not in err


def test_eval_of_an_ffcv_run_without_eval_path_says_to_set_it_with_exit_2(tiny_run, tmp_path):
    err = _one_line_error(_cli("eval", "--config", "configs/demo.yaml", "--checkpoint", str(tiny_run),
                               "data.source=ffcv", f"data.path={tmp_path / 'train.beton'}"))
    assert "mto-ds: evaluation with data.source=ffcv reads labelled train/ and val/ ImageFolders: set eval.path" \
        in err


def test_export_refuses_an_output_it_cannot_write_before_loading_and_names_a_missing_run(tiny_run, tmp_path):
    """Was torch's `RuntimeError: [enforce fail at inline_container.cc] open file failed` after the
    weights were merged; and a missing run was "no complete checkpoint under" it."""
    (tmp_path / "notes.txt").write_text("a file")
    cases = {tmp_path: f"cannot write {tmp_path}: it is a directory",
             tmp_path / "notes.txt" / "encoder.pt": f"{tmp_path / 'notes.txt'} is not a directory"}
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases[tmp_path / "read-only" / "encoder.pt"] = f"{tmp_path / 'read-only'} is not writable"
    for out, message in cases.items():
        result = _cli("export", str(tiny_run), str(out))
        assert message in _one_line_error(result), out
        assert "Reconstructed" not in result.stdout + result.stderr  # DeepSpeed's merge of the weights never ran
    missing = tmp_path / "no-run"
    err = _one_line_error(_cli("export", str(missing), str(tmp_path / "encoder.pt")))
    assert f"mto-ds: {missing} does not exist" in err


def test_export_of_a_checkpoint_directory_prints_the_timm_call_with_its_img_size(tiny_run, tmp_path):
    out = tmp_path / "encoder.pt"
    result = _cli("export", str(tiny_run / "checkpoints" / "step_00000002"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()  # the result only: DeepSpeed's merge reports on stderr
    assert line.startswith(f"wrote {out} (") and line.endswith(
        f"load with timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=64, checkpoint_path='{out}', "
        "pretrained_cfg_overlay=dict(input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), "
        "crop_pct=0.875))")
    assert "Reconstructed fp32 state dict" in result.stderr
    # The call as printed: timm's data config is pre-training's (ImageNet's statistics, not the 0.5
    # of timm's default for this architecture) and evaluation's crop.
    from timm.data import resolve_data_config
    printed = eval(line.split("load with ", 1)[1], {"timm": timm})
    assert resolve_data_config({}, model=printed) == {
        "input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


def test_export_as_a_timm_folder_loads_whole_with_the_runs_size_preprocessing_and_pooled_features(tiny_run, tmp_path):
    """`mto-ds export RUN OUT --folder`: what timm.create_model('local-dir:OUT') (and the Hugging
    Face Hub, as a model repository) loads without arguments: the run's image size, its
    preprocessing, and as features the mean of the final norm's patch tokens, which the evaluation
    reads (eval.pooling=mean). An output that is a file or a folder holding files is refused."""
    from timm.data import resolve_data_config
    from mto_ds.eval.features import pool_tokens
    folder = tmp_path / "hub"
    result = _cli("export", str(tiny_run), str(folder), "--folder")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (f"wrote {folder}/ (config.json, model.safetensors); load with timm.create_model("
                                     f"'local-dir:{folder}'), or upload the folder as a Hugging Face model repository")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    as_read = {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config({}, model=loaded).items()}
    assert as_read == {
        "input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    _cli("export", str(tiny_run), str(tmp_path / "encoder.pt"))
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64,
                                  checkpoint_path=str(tmp_path / "encoder.pt")).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), pool_tokens(reference.forward_features(images), "mean", 1))
    (tmp_path / "a_file").write_text("x")
    for out, said in [(folder, f"cannot write the folder {folder}: it holds files already"),
                      (tmp_path / "a_file", f"cannot write the folder {tmp_path / 'a_file'}: a file is there")]:
        assert said in _one_line_error(_cli("export", str(tiny_run), str(out), "--folder"))


def test_export_to_safetensors_gives_timm_the_same_weights_and_records_the_model(tiny_run, tmp_path):
    """OUT ending in .safetensors is written in that format (no pickle; timm and Hugging Face read
    it), the same tensors as the torch.save export, with the run's model settings as metadata;
    model.init_from and `mto-ds eval` read it back."""
    from safetensors import safe_open
    from mto_ds.engine.export import export_encoder
    from mto_ds.models.weights import read_weights
    export_encoder(tiny_run, tmp_path / "encoder.pt")
    said = export_encoder(tiny_run, tmp_path / "encoder.safetensors")
    assert f"checkpoint_path='{tmp_path / 'encoder.safetensors'}', " in said
    reference = torch.load(tmp_path / "encoder.pt", weights_only=True)
    loaded = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64,
                               checkpoint_path=str(tmp_path / "encoder.safetensors"))
    assert set(loaded.state_dict()) == set(reference)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    with safe_open(tmp_path / "encoder.safetensors", "pt") as f:
        assert f.metadata()["model.arch"] == "vit_tiny_patch16" and f.metadata()["model.img_size"] == "64"
    assert set(read_weights(tmp_path / "encoder.safetensors")) == {f"encoder.{k}" for k in reference}


def test_make_ffcv_refuses_an_output_it_cannot_write_before_reading_the_source(tmp_path):
    """Was an OSError traceback (exit 1) after the checking pass over every image."""
    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(tmp_path / "src" / "c0" / "a.png")
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "folder.beton").mkdir()
    cases = {tmp_path / "notes.txt" / "x.beton": f"{tmp_path / 'notes.txt'} is not a directory",
             tmp_path / "folder.beton": f"cannot write {tmp_path / 'folder.beton'}: it is a directory"}
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases[tmp_path / "read-only" / "x.beton"] = f"{tmp_path / 'read-only'} is not writable"
    for out, message in cases.items():
        result = subprocess.run([sys.executable, "tools/make_ffcv.py", str(tmp_path / "src"), str(out),
                                 "--workers", "1", "--no-progress"], cwd=REPO, env=cpu_env(),
                                capture_output=True, text=True, timeout=300)
        err = _one_line_error(result)
        assert err.startswith(f"make_ffcv: cannot write {out}") and message in err, out


def test_a_missing_config_names_both_places_it_was_looked_for(tmp_path):
    """From another working directory the message named only the checkout's fallback path."""
    result = subprocess.run([sys.executable, "-m", "mto_ds", "pretrain", "--config", "nope.yaml"], cwd=tmp_path,
                            env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    err = _one_line_error(result)
    assert "config file not found: nope.yaml" in err
    assert str(tmp_path / "nope.yaml") in err and str(REPO / "nope.yaml") in err


def test_a_value_of_the_wrong_type_is_named_without_omegaconfs_internals():
    result = _cli("pretrain", "--config", "configs/demo.yaml", "train.steps=abc")
    assert _one_line_error(result) == ("mto-ds: config error: override 'train.steps=abc': bad value for "
                                       "'train.steps': Value 'abc' of type 'str' could not be converted to Integer\n")


DRY_RUN_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from mto_ds import cli
from mto_ds.engine import trainer

built = trainer.build_mim_model
devices = []

def recorded(*args, **kwargs):
    devices.append(str(torch.get_default_device()))
    return built(*args, **kwargs)

trainer.build_mim_model = recorded
for name, argv in json.loads(sys.argv[1]).items():
    code = cli.main(["pretrain", "--config", "configs/demo.yaml", "--dry-run", *argv])
    print("case", name, code, devices.pop() if devices else None, dist.is_initialized(), flush=True)
    print("end", name, file=sys.stderr, flush=True)
"""


def _by_case(output: str, closing: str) -> dict:
    """case name -> the lines a case printed before the line `closing + name ...` ended it."""
    cases, lines = {}, []
    for line in output.splitlines():
        if line.startswith(closing):
            cases[line.split()[1]] = "\n".join(lines)
            lines = []
        else:
            lines.append(line)
    return cases


def test_dry_run_reports_what_a_start_on_n_ranks_would_do_without_starting_or_writing_anything(tiny_run, tmp_path):
    """`pretrain --dry-run --world-size N`, for a job not yet queued: the batch split over N ranks,
    the data counted as the loader counts it, the schedule, the model's size (built on the meta
    device: no weights), the DeepSpeed file through DeepSpeed's validation, and the checkpoint a
    start would resume from, with what a start would refuse refused (exit 2): all without a
    process group and without writing. Checkpoints are tiny_run's (1 rank, ZeRO-2, step 2), named
    by checkpoint.resume, or linked into a folder beside a newer one whose file is missing."""
    from mto_ds.data import write_image_folder
    from mto_ds.models import create_mim_model, mask_fn_for
    images = write_image_folder(tmp_path / "images", 70, 4, size=48)
    saved = tiny_run / "checkpoints" / "step_00000002"
    linked = tmp_path / "linked"
    (linked / "step_00000002").mkdir(parents=True)
    for path in saved.iterdir():
        (linked / "step_00000002" / path.name).symlink_to(path)
    newer = json.loads((saved / "complete.json").read_text())
    newer["step"] = 3
    (linked / "step_00000003").mkdir()
    (linked / "step_00000003" / "complete.json").write_text(json.dumps(newer))
    (tmp_path / "only_damaged" / "step_00000003").mkdir(parents=True)
    (tmp_path / "only_damaged" / "step_00000003" / "complete.json").write_text(json.dumps(newer))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "running.json").write_text(json.dumps(
        {"job": "slurm:4242", "host": "gpu-node-7", "pid": 99, "started": "2026-12-07 09:00:00"}))
    folder = ["data.source=folder", f"data.path={images}"]
    at32, small = tmp_path / "at32.pt", tmp_path / "small.pt"
    torch.save(create_encoder("vit_tiny_patch16", img_size=32).state_dict(), at32)
    torch.save(create_encoder("vit_small_patch16", img_size=64).state_dict(), small)
    (tmp_path / "hub").mkdir()  # a timm model folder: export --folder's, or a Hub model downloaded
    (tmp_path / "hub" / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    torch.save(create_encoder("vit_tiny_patch16", img_size=64).state_dict(), tmp_path / "hub" / "pytorch_model.bin")
    cases = {
        "three_ranks_folder": ["--world-size", "3", f"run.output_dir={tmp_path / 'new'}", *folder,
                               "checkpoint.every_minutes=30", "checkpoint.keep_every_epochs=1"],
        "resume_on_three": ["--world-size", "3", f"run.output_dir={tmp_path / 'r'}", f"checkpoint.resume={saved}"],
        "damaged_newest_skipped": [f"run.output_dir={tmp_path / 'd'}", f"checkpoint.resume={linked}"],
        "held": [f"run.output_dir={tmp_path / 'held'}"],
        "every_checkpoint_damaged": [f"run.output_dir={tmp_path / 'a'}",
                                     f"checkpoint.resume={tmp_path / 'only_damaged'}"],
        "other_zero_stage": [f"run.output_dir={tmp_path / 'z'}", f"checkpoint.resume={saved}",
                             "deepspeed.config=ds_configs/cpu_zero3.json"],
        "more_ranks_than_samples": ["--world-size", "33", f"run.output_dir={tmp_path / 'w'}"],
        # model.init_from: a run's weights found (merged only by the start), a file's fitted, each refused
        # when of another encoder; not read by a start that resumes.
        "init_from_run": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tiny_run}"],
        "init_from_run_at_32px": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tiny_run}",
                                  "model.img_size=32"],
        "init_from_file_at_32px": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={at32}"],
        "init_from_timm_folder": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tmp_path / 'hub'}"],
        "init_from_run_of_another_arch": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tiny_run}",
                                          "model.arch=vit_small_patch16"],
        "init_from_file_of_another_arch": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={small}"],
        "init_from_when_resuming": [f"run.output_dir={tmp_path / 'r'}", f"checkpoint.resume={saved}",
                                    f"model.init_from={at32}"],
        # Named before the model is built, as data.path is: nothing there, or no checkpoint in it.
        "init_from_gone": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tmp_path / 'gone.pt'}"],
        "init_from_without_checkpoints": [f"run.output_dir={tmp_path / 'i'}", f"model.init_from={tmp_path / 'held'}"],
    }
    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    result = subprocess.run([sys.executable, "-c", DRY_RUN_SCRIPT, json.dumps(cases)], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outcomes = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("case ")]
    refused_unbuilt = ("every_checkpoint_damaged", "other_zero_stage", "more_ranks_than_samples", "init_from_gone",
                       "init_from_without_checkpoints", "init_from_run_of_another_arch")
    refused = (*refused_unbuilt, "init_from_file_of_another_arch")  # a file's shapes: fitted to the built model
    assert outcomes == [[name, "2" if name in refused else "0", "None" if name in refused_unbuilt else "meta", "False"]
                        for name in cases], result.stdout
    reports, errors = _by_case(result.stdout, "case "), _by_case(result.stderr, "end ")

    report = reports["three_ranks_folder"]
    assert "mto-ds pretrain --dry-run: configs/demo.yaml on 3 ranks; nothing was started" in report
    model = create_mim_model("vit_tiny_patch16", "simmim", img_size=64, mto={"enabled": True})
    mask_fn_for(model, "simmim", 64)
    params = sum(p.numel() for p in model.parameters())
    assert (f"  model: vit_tiny_patch16 simmim, 64 px: {params / 1e6:.1f} M parameters, "
            f"{model.flops_per_image() / 1e9:.1f} GFLOPs per image") in report
    assert f"  data: folder {images}, 70 images" in report.splitlines()
    assert "  batch: global batch 32 = 3 ranks x 10-11 samples (the ranks do not divide it), in 1 micro-batch(es)" \
        in report
    # 70 images: 2 steps of 32 an epoch; the demo's 3 epochs and half an epoch of warm-up.
    assert "  schedule: 2 steps per epoch, 6 steps (3 epochs), warm-up 1 steps, peak lr 0.000125" in report.splitlines()
    assert "  deepspeed: ds_configs/cpu_zero2.json, ZeRO-2, fp32: accepted by DeepSpeed's validation" in report
    assert f"  run directory: {tmp_path / 'new'}: starts at step 0" in report.splitlines()
    assert not (tmp_path / "new").exists()
    # The disk a run's checkpoints take, per DeepSpeed's layout; tiny_run's save of this model
    # (ZeRO-2, fp32: 16 bytes per parameter) is the measure. 3 epochs, each end kept.
    (line,) = [line for line in report.splitlines() if line.startswith("  checkpoints: ")]
    assert line.startswith("  checkpoints: every 50 steps, every 30 min, at the end and on a stop signal; the newest "
                           "2 kept, and the ends of epochs 1, 2, ... for good (3 in this run); about ")
    saved_bytes = sum(file_sizes(saved).values())
    assert 16 * params == pytest.approx(saved_bytes, rel=0.02)
    assert line.endswith(f" GB each (16 bytes per parameter), at most {6 * 16 * params / 1e9:.3g} GB at once")

    assert (f"  run directory: {tmp_path / 'r'}: resumes from {saved} at step 2 of 96; saved on 1 rank, it is "
            f"converted to DeepSpeed's universal format for 3 first") in reports["resume_on_three"]
    assert (f"  run directory: {tmp_path / 'd'}: resumes from {linked / 'step_00000002'} at step 2 of 96; "
            f"skipped as damaged: step_00000003 (") in reports["damaged_newest_skipped"]
    assert ("  run directory: running.json names slurm:4242 on gpu-node-7, pid 99, started 2026-12-07 09:00:00; "
            "while that start lives, a start now stops (exit status 2)") in reports["held"]
    # A start stops where no complete checkpoint loads: it never begins such a run afresh.
    assert (f"config error: none of the 1 complete checkpoints under {tmp_path / 'only_damaged'} has its files at "
            "their saved sizes (step_00000003 (") in errors["every_checkpoint_damaged"]
    assert (f"config error: checkpoint {saved} was saved with ZeRO-2, this run uses ZeRO-3"
            in errors["other_zero_stage"])
    assert ("config error: train.global_batch_size=32 is smaller than the 33 data-parallel ranks"
            in errors["more_ranks_than_samples"])
    assert (f"  model.init_from: {saved} (step 2): the start merges its weights and takes its encoder's, and its "
            "decoder and mask token where they fit") in reports["init_from_run"].splitlines()
    # Another model.img_size: the start fits the position table to it; another model.arch is refused.
    assert (f"  model.init_from: {saved} (step 2): the start merges its weights and takes its encoder's, and its "
            "decoder and mask token where they fit; its encoder.pos_embed, of model.img_size=64, is fitted to 32"
            ) in reports["init_from_run_at_32px"].splitlines()
    assert (f"  model.init_from: {at32}: 150 encoder weights; the decoder and mask token start fresh (not in it in "
            "these shapes); encoder.pos_embed resampled from 2x2 to 4x4 patches (bicubic)"
            ) in reports["init_from_file_at_32px"].splitlines()
    assert (f"  model.init_from: {tmp_path / 'hub'}: 150 encoder weights; the decoder and mask token start fresh "
            "(not in it in these shapes)") in reports["init_from_timm_folder"].splitlines()
    assert (f"config error: bad value for 'model.init_from': {tiny_run} was pre-trained with another encoder "
            "(model.arch: vit_tiny_patch16 there, vit_small_patch16 here)") in errors["init_from_run_of_another_arch"]
    assert (f"config error: bad value for 'model.init_from': {small} does not fit this run's encoder (model.arch, "
            "model.img_size): 150 of other shapes (encoder.cls_token [1, 1, 384] there, [1, 1, 192] here, "
            "encoder.pos_embed [1, 17, 384] there, [1, 17, 192] here, encoder.patch_embed.proj.weight "
            "[384, 3, 16, 16] there, [192, 3, 16, 16] here, ...)") in errors["init_from_file_of_another_arch"]
    assert (f"  model.init_from: {at32} is not read: the start resumes from the run's checkpoints"
            in reports["init_from_when_resuming"].splitlines())
    assert (f"config error: bad value for 'model.init_from': {tmp_path / 'gone.pt'} does not exist (a run or "
            "checkpoint directory, or a weights file)") in errors["init_from_gone"]
    assert (f"config error: bad value for 'model.init_from': {tmp_path / 'held'} holds no complete checkpoint"
            in errors["init_from_without_checkpoints"])
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at32.pt", "held", "hub", "images", "linked", "only_damaged",
                                                          "small.pt"]
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["running.json"]


def test_an_error_line_is_one_write_so_ranks_that_fail_together_do_not_interleave(monkeypatch):
    """print() writes the text and then the newline: two ranks failing at once on the launcher's
    shared stderr made 'A' 'B' '\n' '\n' of their lines (seen in the 2-rank bad-file start)."""
    import io
    writes = []

    class Recording(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)
    monkeypatch.setattr(sys, "stderr", Recording())
    # eval, not pretrain: pretrain's StopRequest would stay installed in this pytest process, and a
    # later test's forked pool workers would ignore the SIGTERM of Pool.terminate (a hang seen).
    import signal
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["eval", "--config", "configs/demo.yaml", "--checkpoint", "x", "train.epochz=3"]) == 2
    assert signal.getsignal(signal.SIGTERM) is handler
    assert writes == ["mto-ds: config error: override 'train.epochz=3': unknown config key 'train.epochz'; did you "
                      "mean train.epochs, train.warmup_epochs, train.steps?\n"]


def _bad_file_stops_every_rank(run, tmp_path, config):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    result = pretrain(run, f"model.init_from={notes}", config, nproc=2, check=False, timeout=300)
    # torchrun exits 1 for a failed rank; each rank's own exit status is in its summary.
    assert result.returncode == 1 and result.stderr.count("exitcode  : 2") == 2, result.stderr[-3000:]
    message = (f"bad value for 'model.init_from': {notes} is not a weights file that torch.load reads with "
               "weights_only=True (UnpicklingError: Weights only load failed)")
    assert f"mto-ds: config error: {message}\n" in result.stderr
    assert f"mto-ds: config error: on rank 0: {message}\n" in result.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_begun_from_another_runs_checkpoint_holds_its_weights_on_every_rank(tiny_run, tmp_path, stage):
    """model.init_from: rank 0 alone reads the weights, and deepspeed.initialize hands them to the
    other rank: the engine broadcasts rank 0's parameters (with that broadcast taken out by hand,
    the ZeRO-2 case failed: rank 1's own random weights were in its half of the partitioned
    masters), and ZeRO-3 broadcasts each one from rank 0 again as it partitions it. A file that is
    not weights stops both ranks with exit 2, rank 1 waiting in the agreement, not in a collective
    rank 0 never reaches."""
    config = f"deepspeed.config=ds_configs/cpu_zero{stage}.json"
    run = tmp_path / "run"
    if stage == 3:
        _bad_file_stops_every_rank(run, tmp_path, config)
    # One step at an LR of 1e-30: Adam moves each weight by about 1e-30, below fp32's resolution of any
    # weight that is not 0, and weight decay multiplies by 1 - 5e-32, i.e. by 1.
    result = pretrain(run, f"model.init_from={tiny_run}", config, "train.steps=1", "train.lr=1e-30", nproc=2)
    began, after = checkpoint_model_state(tiny_run), checkpoint_model_state(run)
    assert sorted(after) == sorted(began)
    for name, weight in began.items():
        torch.testing.assert_close(after[name], weight, rtol=1e-6, atol=1e-20, msg=name)
    encoder = sum(name.startswith("encoder.") for name in began)
    assert (f"initialised from {tiny_run}: {encoder} encoder weights and the 3 of the decoder and mask token"
            in result.stdout + result.stderr)
    marker = json.loads((tiny_run / "checkpoints" / "step_00000002" / "complete.json").read_text())
    start = json.loads((run / "starts.jsonl").read_text().splitlines()[-1])
    assert start["initialised_from"] == {"path": str(tiny_run), "tag": "step_00000002", "step": 2,
                                         "saved": marker["time"]}


def test_print_config_shows_every_key_resolved_and_reads_back_as_the_same_config(tmp_path, capsys):
    """`--print-config`: what a chain of _base_ files and overrides comes to, every key with its
    value (the schema's defaults included), checked as a start checks it, without torch; given as
    --config, the output is the same run."""
    import yaml
    from mto_ds.config import VALID_KEYS
    study = tmp_path / "study.yaml"
    study.write_text(f"_base_: {REPO / 'configs' / 'demo.yaml'}\ntrain:\n  epochs: 7\n")
    assert main(["pretrain", "--config", str(study), "mto.lambda_e=0.3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert (resolved["train"]["epochs"], resolved["mto"]["lambda_e"], resolved["model"]["init_from"]) == (7, 0.3, None)
    assert resolved["model"]["arch"] == "vit_tiny_patch16"  # from the _base_
    assert sorted(f"{section}.{key}" for section, keys in resolved.items() for key in keys) == sorted(VALID_KEYS)
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == load_config(study, ["mto.lambda_e=0.3"])
    assert main(["eval", "--config", str(study), "--checkpoint", "x", "--print-config", "eval.knn_k=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["knn_k"] == 5
    # Checked: a misspelt key fails as it would at a start; with --dry-run it is one or the other.
    assert main(["pretrain", "--config", str(study), "train.epoch=3", "--print-config"]) == 2
    assert "unknown config key 'train.epoch'; did you mean train.epochs" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(study), "--print-config", "--dry-run"]) == 2
    assert "--print-config and --dry-run: give one" in capsys.readouterr().err
    result = _cli("pretrain", "--config", str(study), "mto.lambda_e=0.3", "--print-config",
                  python_options=("-X", "importtime"))
    assert result.returncode == 0 and result.stdout == printed and not _imports_torch(result)


def test_world_size_without_dry_run_is_refused_a_start_takes_its_ranks_from_its_launcher(capsys):
    from mto_ds import cli
    assert cli.main(["pretrain", "--config", "configs/demo.yaml", "--world-size", "4"]) == 2
    assert "--world-size goes with --dry-run" in capsys.readouterr().err


# `mto-ds reconstruct` on tiny_run's checkpoint (its pieces: tests/test_reconstruct.py).

def _run_model_losses(run, images, masks):
    """loss_mim of each image under the run's newest weights, loaded here without the CLI's code."""
    model, _ = build_mim_model(load_config(run / "config.yaml", training=False))
    model.load_state_dict(checkpoint_model_state(run), strict=True)
    with torch.no_grad():
        return [model.eval()(images[i:i + 1], masks[i:i + 1])["loss_mim"].item() for i in range(len(images))]


def _printed_losses(out: str):
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {" ".join(name): float(loss) for loss, *name in rows}


def test_status_reads_a_real_runs_files(tiny_run):
    """What the trainer writes (starts.jsonl with its schedule, metrics rows, state.json, a
    complete checkpoint) is what `mto-ds status` reads: test_status.py writes the same by hand."""
    result = _cli("status", str(tiny_run), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = json.loads(result.stdout)
    assert (row["state"], row["detail"], row["step"], row["total_steps"]) == ("finished", "completed", 2, 2)
    assert row["checkpoints"] == [2] and row["starts"] == 1 and row["last_start"]["world_size"] == 1
    assert row["images_per_sec"] > 0 and row["hours_to_go"] is None


def test_reconstruct_draws_a_runs_checkpoint_on_held_out_images_and_prints_their_losses(tiny_run, tmp_path, capsys):
    """The demo config's run (SimMIM + MTO, synthetic images): its held-out images are the
    evaluation's val split, synthetic samples past the pre-training set."""
    out = tmp_path / "figure.png"
    assert main(["reconstruct", str(tiny_run), str(out), "--count", "3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 3 image(s) of 64 px, step_00000002 of {tiny_run} (vit_tiny_patch16 simmim)" in printed
    assert "columns: image | masked input | prediction | prediction with the visible patches pasted back" in printed
    with Image.open(out) as figure:
        assert figure.size == (4 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    cfg = load_config(tiny_run / "config.yaml", training=False)
    held_out = held_out_images(cfg, 3)
    names = [held_out.name(i) for i in range(3)]
    assert names == [f"synthetic image {1024 + i} (seed 0)" for i in range(3)]  # past eval.num_train's 1024
    losses = _printed_losses(printed)
    images = normalize(torch.stack([held_out[i][0] for i in range(3)]))
    _, mask_fn = build_mim_model(cfg)
    expected = _run_model_losses(tiny_run, images, batch_masks(mask_fn, 5, 0, range(3)))
    assert [losses[name] for name in names] == pytest.approx(expected, abs=1e-4)
    assert losses["mean"] == pytest.approx(np.mean(expected), abs=1e-4)
    # The same seed draws the same figure; another seed other masks.
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert main(["reconstruct", str(tiny_run / "checkpoints"), str(again), "--count", "3", "--seed", "5"]) == 0
    assert main(["reconstruct", str(tiny_run), str(other), "--count", "3", "--seed", "6"]) == 0
    capsys.readouterr()
    assert again.read_bytes() == out.read_bytes() and other.read_bytes() != out.read_bytes()


def test_images_given_are_read_from_files_and_folders_and_an_undecodable_one_is_skipped_and_named(
        tiny_run, tmp_path, capsys, caplog):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.jpg", "sub/c.png", "a.jpeg"):
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(single)
    out = tmp_path / "figure.png"
    assert main(["reconstruct", str(tiny_run), str(out), str(single), str(folder), "--count", "4"]) == 0
    losses = _printed_losses(capsys.readouterr().out)
    # The file first, then the folder's images by path, the broken one left out: four in all.
    assert list(losses) == [str(single), str(folder / "a.jpeg"), str(folder / "b.jpg"), str(folder / "sub" / "c.png"),
                            "mean"]
    assert f"skipping undecodable image {folder / 'broken.jpg'}" in caplog.text
    with Image.open(out) as figure:
        assert figure.size == (4 * 66 + 2, 4 * 66 + 2)


def test_reconstruct_names_a_bad_path_or_output_before_loading_anything(tiny_run, tmp_path, capsys):
    checkpoint_copy = tmp_path / "step_copy"
    checkpoint_copy.mkdir()
    cases = {
        (str(tmp_path / "no-run"), str(tmp_path / "a.png")): f"{tmp_path / 'no-run'} does not exist",
        (str(tiny_run), str(tmp_path / "a.png"), str(tmp_path / "no-image.jpg")):
            f"{tmp_path / 'no-image.jpg'} does not exist",
        (str(tiny_run), str(tmp_path / "weights.pt")): f"{tmp_path / 'weights.pt'}: name a .png or .jpg to write",
        (str(tiny_run), str(tmp_path)): f"cannot write {tmp_path}: it is a directory",
        (str(checkpoint_copy), str(tmp_path / "a.png")):
            f"no config.yaml in {checkpoint_copy} or the two folders above",
    }
    for args, message in cases.items():
        assert main(["reconstruct", *args]) == 2, args
        assert f"mto-ds: {message}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def _run_with_config(tiny_run, run, *replacements):
    """A run directory holding tiny_run's checkpoints and its config.yaml with `replacements` made."""
    run.mkdir()
    (run / "checkpoints").symlink_to(tiny_run / "checkpoints")
    config = (tiny_run / "config.yaml").read_text()
    for old, new in replacements:
        assert old in config
        config = config.replace(old, new, 1)
    (run / "config.yaml").write_text(config)
    return run


def test_a_run_whose_evaluation_has_no_val_folder_is_told_to_name_images(tiny_run, tmp_path, capsys):
    """A folder or FFCV run reads held-out images from the evaluation's val/ ImageFolder."""
    run = _run_with_config(tiny_run, tmp_path / "run", ("source: synthetic", "source: ffcv"),
                           ("  path: null", f"  path: {tmp_path / 'train.beton'}"))
    assert main(["reconstruct", str(run), str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "evaluation with data.source=ffcv reads labelled train/ and val/ ImageFolders: set eval.path" in err
    assert "or name the images to reconstruct after the output file" in err


def test_a_folder_runs_held_out_images_are_one_per_class_of_the_evaluation_val_split(tiny_run, tmp_path, capsys):
    """data.source=folder without eval.path: the val/ beside data.path (IMAGENET/train -> IMAGENET/val),
    a class-balanced draw: three images, three classes, named by their files."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (tmp_path / "imagenet" / "val" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (72, 90, 3), dtype=np.uint8)).save(
                tmp_path / "imagenet" / "val" / cls / f"{i}.png")
    run = _run_with_config(tiny_run, tmp_path / "run", ("source: synthetic", "source: folder"),
                           ("  path: null", f"  path: {tmp_path / 'imagenet' / 'train'}"))
    assert main(["reconstruct", str(run), str(tmp_path / "a.png"), "--count", "3"]) == 0
    names = [name for name in _printed_losses(capsys.readouterr().out) if name != "mean"]
    assert len(names) == 3 and {Path(name).parent.name for name in names} == {"a", "b", "c"}
    assert all(Path(name).parent.parent == tmp_path / "imagenet" / "val" for name in names)


def test_a_run_trained_with_the_fused_gpu_kernel_is_reconstructed_without_a_gpu(tiny_run, tmp_path, capsys):
    """mto.kernel=fused needs CUDA; the statistics it computes do not change the prediction."""
    run = _run_with_config(tiny_run, tmp_path / "run", ("kernel: auto", "kernel: fused"))
    assert main(["reconstruct", str(run), str(tmp_path / "a.png"), "--count", "1"]) == 0
    assert "synthetic image 1024" in capsys.readouterr().out
