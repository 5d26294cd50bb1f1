"""Planning and benchmark tools: arithmetic on known inputs, and the bench running on CPU."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_run_communication_volume_per_zero_stage():
    plan_run = _load("plan_run")
    psi = 1_000_000
    # bf16 (2 bytes), 2 GPUs: a ring moves half the data
    assert plan_run.comm_bytes_per_step(psi, 1, accumulation=4, gpus=2) == pytest.approx(2 * psi * 2 * 0.5)
    assert plan_run.comm_bytes_per_step(psi, 2, accumulation=4, gpus=2) == pytest.approx(5 * psi * 2 * 0.5)
    assert plan_run.comm_bytes_per_step(psi, 3, accumulation=4, gpus=2) == pytest.approx(12 * psi * 2 * 0.5)
    assert plan_run.comm_bytes_per_step(psi, 3, accumulation=4, gpus=1) == 0.0


def test_plan_run_wall_time_and_gpu_hours():
    plan_run = _load("plan_run")
    r = plan_run.plan(params=300_000_000, epochs=10, dataset=1_024_000, gpus=8, rate_per_gpu=100.0,
                      global_batch=1024, micro_batch=64, zero=1, link_gbps=1e9)
    assert r["steps"] == 10 * 1000 and r["accumulation"] == 2
    assert r["compute_s_per_step"] == pytest.approx(1024 / 800)
    assert r["wall_hours"] == pytest.approx(10_000 * 1.28 / 3600, rel=1e-6)  # comm negligible here
    assert r["gpu_hours"] == pytest.approx(r["wall_hours"] * 8)


def test_plan_run_splits_the_batch_by_the_trainers_rule():
    from mto_ds.config import ConfigError
    plan_run = _load("plan_run")
    common = dict(params=300_000_000, epochs=1, dataset=1_281_167, rate_per_gpu=100.0, zero=2, link_gbps=400)
    r = plan_run.plan(gpus=64, global_batch=2048, micro_batch=64, **common)
    assert (r["micro_batch"], r["accumulation"]) == (32, 1)  # 2048 over 64 GPUs leaves 32 each
    # 48 GPUs: shares of 42 and 43; the larger sets the step's compute time.
    r = plan_run.plan(gpus=48, global_batch=2048, micro_batch=64, **common)
    assert (r["micro_batch"], r["accumulation"]) == (43, 1)
    assert r["compute_s_per_step"] == pytest.approx(43 / 100.0)
    with pytest.raises(ConfigError, match="smaller than the 4096 data-parallel ranks"):
        plan_run.plan(gpus=4096, global_batch=2048, micro_batch=64, **common)


def test_plan_run_counts_vit_large_parameters():
    params = _load("plan_run").count_params("vit_large_patch16", "simmim")
    assert 300e6 < params < 310e6  # ViT-L/16 encoder ~303M plus SimMIM's mask token and decoder


def test_bench_step_runs_on_cpu_and_reports_baseline_and_engine_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "tools/bench_step.py", "--tiny", "--method", "simmim", "--mto", "on",
                             "--mto-kernel", "auto", "sdpa", "--zero", "2", "--workers", "0", "--json", str(out)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [r["config"] for r in report["rows"]]
    assert names[0].startswith("baseline timm") and names[1:] == ["simmim ZeRO-2 MTO on", "simmim ZeRO-2 MTO on [sdpa]"]
    for row in report["rows"]:
        assert row["images_per_sec"] > 0 and row["tflops"] > 0 and 0 <= row["data_wait"] <= 1
        assert min(row["launches"][phase] for phase in ("forward", "backward", "after")) > 0, row
    assert report["peak_tflops"] > 0


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_host_floor_model_keeps_every_block_and_parameter_tensor_at_the_narrow_width(method):
    """--width: the host issues one launch per tensor and per block, so the narrowed model must
    have the arch's blocks and parameter tensors (the MAE decoder's too), only narrower."""
    from mto_ds.models import create_mim_model
    narrowed = _load("bench_step").narrowed
    full = create_mim_model("vit_small_patch16", method, img_size=32)
    narrow = create_mim_model("vit_small_patch16", method, img_size=32, **narrowed(16))
    assert [n for n, _ in narrow.named_parameters()] == [n for n, _ in full.named_parameters()]
    attentions = [m for m in narrow.modules() if hasattr(m, "qkv")]
    assert len(attentions) == len([m for m in full.modules() if hasattr(m, "qkv")]) >= 12
    assert {(m.qkv.in_features, m.num_heads) for m in attentions} == {(16, 1)}
    assert narrowed(None) == {}


def test_bench_step_host_floor_rows_run_bf16_on_cpu_with_the_gpu_deepspeed_file(tmp_path):
    """--width --bf16 on CPU: the rows of the GPU's host-floor measurement, the engine row on the
    shipped bf16 ZeRO-1 file, the baseline's optimizer one fused kernel as on a GPU."""
    out = tmp_path / "floor.json"
    result = subprocess.run([sys.executable, "tools/bench_step.py", "--tiny", "--width", "32", "--bf16",
                             "--method", "mae", "--mto", "off", "--zero", "1", "--data", "none", "--json", str(out)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 matmul peak" in result.stdout
    baseline, plain_mae, engine = json.loads(out.read_text())["rows"]
    assert baseline["config"] == "baseline timm vit_tiny_patch16 SDPA, no DS, no MTO width 32"
    assert plain_mae["config"] == "baseline MAE vit_tiny_patch16 plain PyTorch, no DS, no MTO width 32"
    assert engine["config"] == "mae ZeRO-1 MTO off width 32"
    assert baseline["launches"]["after"] <= 3 and baseline["launches"]["syncs"] == 0  # fused AdamW
    # The same MAE model and FLOPs with and without DeepSpeed: the plain loop's optimizer is a few
    # fused kernels, DeepSpeed's step loops over the gradient tensors.
    assert plain_mae["tflops"] * plain_mae["step_ms"] == pytest.approx(engine["tflops"] * engine["step_ms"])
    assert plain_mae["launches"]["after"] <= 5 and plain_mae["launches"]["syncs"] == 0  # MAE knows its visible count
    assert engine["launches"]["after"] > 100 and engine["step_ms"] > 0  # DeepSpeed's per-tensor loops


def test_launch_count_splits_a_step_into_forward_backward_and_after_and_counts_host_syncs():
    import torch
    count_launches = _load("bench_step").count_launches
    w, x = torch.randn(4, 4, requires_grad=True), torch.randn(2, 4)

    def step():
        y = (x @ w).sum()      # forward: mm, sum (and backward's seed, ones_like, before the engine starts)
        y.item()               # one host sync
        y.backward()           # inside the autograd engine: one mm for w's gradient (t/expand are views)
        with torch.no_grad():
            w.add_(w.grad, alpha=-0.1)   # after the backward: one launch
        w.grad = None

    assert count_launches(step) == {"forward": 3, "backward": 1, "after": 1, "syncs": 1}
    assert count_launches(lambda: x.view(8).unsqueeze(0).t().detach()) == {
        "forward": 0, "backward": 0, "after": 0, "syncs": 0}  # views launch nothing


def test_bench_step_compares_mto_on_with_off_and_each_row_with_the_baseline():
    compare = _load("bench_step").compare
    rows = [{"config": "baseline timm vit SDPA", "images_per_sec": 100.0, "step_ms": 10.0},
            {"config": "simmim ZeRO-2 MTO on", "images_per_sec": 98.0, "step_ms": 10.2},
            {"config": "simmim ZeRO-2 MTO on [sdpa]", "images_per_sec": 99.0, "step_ms": 10.1},
            {"config": "simmim ZeRO-2 MTO off", "images_per_sec": 100.0, "step_ms": 10.0},
            {"config": "mae ZeRO-2 MTO on", "images_per_sec": 20.0, "step_ms": 50.0},
            {"config": "mae ZeRO-3 MTO on", "error": "out of memory"}]
    assert compare(rows) == ["MTO overhead, simmim ZeRO-2 MTO on: +2.0% step time",
                             "speed vs baseline, simmim ZeRO-2 MTO on: 0.98x",
                             "MTO overhead, simmim ZeRO-2 MTO on [sdpa]: +1.0% step time",
                             "speed vs baseline, simmim ZeRO-2 MTO on [sdpa]: 0.99x",
                             "speed vs baseline, simmim ZeRO-2 MTO off: 1.00x"]
    # MAE against its own plain twin (the same model without DeepSpeed), never the timm encoder.
    plain = {"config": "baseline MAE vit plain PyTorch, no DS, no MTO", "images_per_sec": 25.0, "step_ms": 40.0}
    assert compare(rows[:1] + [plain] + rows[4:]) == ["speed vs plain MAE, mae ZeRO-2 MTO on: 0.80x"]


def test_kernel_busy_share_counts_overlapping_kernels_once_and_gaps_as_idle():
    from mto_ds.engine.profiling import kernel_busy_share as share
    # 0-4 and 2-6 overlap (busy 0-6), idle 6-8, busy 8-10: 8 of 10 microseconds.
    assert share([(8, 10), (0, 4), (2, 6)]) == pytest.approx(0.8)
    assert share([(0, 5), (5, 10)]) == pytest.approx(1.0)
    assert math.isnan(share([]))


def test_bench_step_overrides_are_the_users_json_so_fp32_accumulation_keeps_the_norm_its_optimizer_needs():
    """--ds-set stands for a user's JSON, which the trainer adjusts after reading it: MAE (no
    clipping) under ZeRO-1 bf16 skips DeepSpeed's unread gradient norm, but not with fp32
    gradient accumulation, whose BF16 optimizer refuses to start without it (the override applied
    after the adjustment ended the GPU row in a ValueError)."""
    config = _load("bench_step").engine_ds_config
    assert config("mae", 1, 8, True)["zero_optimization"]["compute_grad_norm"] is False
    fp32_accumulation = config("mae", 1, 8, True, ["data_types.grad_accum_dtype=fp32"])
    assert fp32_accumulation["data_types"] == {"grad_accum_dtype": "fp32"}
    assert fp32_accumulation["zero_optimization"].get("compute_grad_norm") is not False
    asked = config("mae", 1, 8, True, ["zero_optimization.compute_grad_norm=true"])
    assert asked["zero_optimization"]["compute_grad_norm"] is True


def test_bench_step_dry_run_rejects_a_misspelt_deepspeed_override_before_any_device_time():
    result = subprocess.run([sys.executable, "tools/bench_step.py", "--dry-run", "--method", "mae", "--mto", "off",
                             "--zero", "1", "--no-baseline", "--ds-set", "zero_optimization.compute_grad_norms=true"],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| mae ZeRO-1 MTO off")]
    assert len(row) == 1 and "invalid" in row[0] and "compute_grad_norms" in row[0], result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--json", "{file}/rows.json"], "--json: cannot write {file}/rows.json: {file} is not a directory"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
])
def test_bench_step_refuses_an_unwritable_json_or_a_zero_step_count_in_its_dry_run(tmp_path, argv, message):
    """--json into a folder that could not be made was found after the first row's minutes of a GPU
    lease (a traceback, the other rows never ran), and --dry-run passed it; --steps 0 ran every
    row into a ZeroDivisionError and exited 0."""
    (tmp_path / "a_file").write_text("")
    argv = [arg.format(file=tmp_path / "a_file") for arg in argv]
    result = subprocess.run([sys.executable, "tools/bench_step.py", "--dry-run", "--arch", "vit_tiny_patch16", *argv],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message.format(file=tmp_path / "a_file") in result.stderr, result.stderr


@pytest.mark.parametrize("tool, argv, message", [
    ("bench_loader", ["--workers", "a"], "--workers 'a': expected comma-separated integers >= 0"),
    ("bench_loader", ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    ("bench_loader", ["--images", "4"], "--images 4 is fewer than one batch (--batch 32)"),
    ("bench_loader", ["--src", "/no/such/folder"], "--src /no/such/folder is not a folder"),
    ("bench_attention", ["--tiles", "64x"], "'64x': expected positive integers MxN[xW[xS]]"),
    ("bench_attention", ["--paths", "sdap"], "invalid choice: 'sdap'"),
])
def test_the_benchmark_tools_name_a_bad_argument_with_exit_2_not_a_traceback(tool, argv, message):
    """Each of these ended in a traceback (bench_loader's --epochs 0 after writing and converting
    the images first), or, for a misspelt --paths, an empty table and exit 0."""
    result = subprocess.run([sys.executable, f"tools/{tool}.py", *argv], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def _table_rows(path):
    """The first cell of each table row of a bench_gpu.sh .md file."""
    return [line.split("|")[1].strip() for line in path.read_text().splitlines() if line.startswith("| ")]


def test_bench_gpu_script_checks_every_part_without_a_gpu_before_a_lease_is_spent(tmp_path):
    """BENCH_DRY_RUN=1: each part's kernel tests are collected, bench_attention runs its CPU shape
    and every bench_step command lists its rows with its DeepSpeed config validated, so an
    argument or config error shows here instead of in a GPU lease. `all quick` names the kernel
    part twice (both include it): it runs once. `trainer` (not in `all`) starts mto-ds pretrain
    itself on the GPU: its dry run is that command's `--dry-run` (the start's own checks: the
    DeepSpeed file, the batch, the model built on the meta device), which must pass."""
    env = cpu_env(BENCH_DRY_RUN="1", PYTHON=sys.executable)
    out = tmp_path / "out"
    result = subprocess.run(["bash", "tools/bench_gpu.sh", str(out), "all", "quick", "trainer"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    commands = [line.split(":")[0] for line in (out / "commands.txt").read_text().splitlines()]
    assert commands == [f"== {name}" for name in (
        "kernel_tests", "attention", "vit_l_quick", "host_floor", "host_floor_noncontiguous", "mae_compute_grad_norm",
        "mae_contiguous_gradients", "mae_b256", "fp32_grad_accum", "vit_l", "vit_l_compiled", "vit_h_b64", "vit_h_b128",
        "vit_h_b64_every2", "trainer")]
    (trainer,) = (out / "trainer.md").read_text().splitlines()
    assert trainer.startswith("| trainer | config valid: would run mto_ds pretrain --config configs/vit_b_simmim.yaml")
    assert "run.profile_step=16" in trainer
    assert "  deepspeed: ds_configs/zero1_bf16.json, ZeRO-1, bf16: accepted by DeepSpeed's validation" in \
        (out / "trainer.log").read_text().splitlines()
    collected = (out / "kernel_tests.log").read_text()
    assert "test_fused_attention.py::test_cuda_kernel_outputs_statistics_and_gradients_match_reference" in collected
    assert "test_sdpa_stats.py::test_cuda_padded_statistics_run_on_flash_attention" in collected
    assert "test_fused_attention.py::test_kernels_compile_for_sm90" in collected
    assert "sdpa-stats-padded" in (out / "attention.md").read_text()
    assert _table_rows(out / "vit_l_quick.md") == [
        "baseline timm vit_large_patch16 SDPA, no DS, no MTO",
        "baseline MAE vit_large_patch16 plain PyTorch, no DS, no MTO",
        "simmim ZeRO-1 MTO on", "simmim ZeRO-1 MTO on [sdpa]", "simmim ZeRO-1 MTO off",
        "mae ZeRO-1 MTO on", "mae ZeRO-1 MTO on [sdpa]", "mae ZeRO-1 MTO off"]
    assert _table_rows(out / "mae_compute_grad_norm.md") == [
        "mae ZeRO-1 MTO off zero_optimization.compute_grad_norm=true"]
    assert _table_rows(out / "mae_contiguous_gradients.md") == [
        "mae ZeRO-1 MTO off zero_optimization.contiguous_gradients=false"]
    assert "batch 256" in (out / "mae_b256.md").read_text()
    assert _table_rows(out / "fp32_grad_accum.md") == [
        f"{method} ZeRO-1 MTO off data_types.grad_accum_dtype=fp32" for method in ("simmim", "mae")]
    assert _table_rows(out / "host_floor.md") == [f"{name} width 64" for name in _table_rows(out / "vit_l_quick.md")]
    assert _table_rows(out / "host_floor_noncontiguous.md") == [
        f"{method} ZeRO-1 MTO off width 64 zero_optimization.contiguous_gradients=false" for method in ("simmim", "mae")]
    assert len(_table_rows(out / "vit_l.md")) == 2 + 2 * 2 * 2  # two baselines + method x stage x MTO
    assert _table_rows(out / "vit_l_compiled.md")[0].endswith("compiled")
    for batch in (64, 128):
        huge = (out / f"vit_h_b{batch}.md").read_text()
        assert f"zero3_bf16.json, 224 px, batch {batch}, mto.kernel=auto, activation checkpointing |" in huge
    assert ("zero3_bf16.json, 224 px, batch 64, mto.kernel=auto, activation checkpointing of one block in 2 |"
            in (out / "vit_h_b64_every2.md").read_text())
    for md in out.glob("*.md"):
        assert "invalid" not in md.read_text(), md


def test_bench_gpu_script_refuses_an_unknown_part_before_running_anything(tmp_path):
    result = subprocess.run(["bash", "tools/bench_gpu.sh", str(tmp_path / "out"), "quick", "larg"], cwd=REPO,
                            env=cpu_env(BENCH_DRY_RUN="1", PYTHON="false"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown part 'larg'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def _blocks_macs(tokens, dim, depth):
    """Multiply-adds of `depth` ViT blocks (MLP ratio 4) over `tokens` tokens: q, k, v, the
    projection and the MLP (12 dim^2 a token), and attention's two matmuls (2 tokens^2 dim)."""
    return depth * (12 * tokens * dim ** 2 + 2 * tokens ** 2 * dim)


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_model_flops_per_image_equal_the_hand_count_with_attention_on_cpu(method):
    """MFU's model FLOPs against an independent count: ViT-Tiny/16 at 64 px (16 patches + CLS,
    width 192, 12 blocks). SimMIM encodes all 17 tokens and decodes each patch linearly to pixels;
    MAE encodes CLS + the 4 visible patches (mask ratio 0.75) and decodes all 17 tokens in 8 blocks
    of width 512. A multiply-add is 2 FLOPs, the backward twice the forward, less the patch
    embedding's gradient with respect to the images, which nothing needs. The CPU count used to
    leave attention out (torch's counter knows only the CUDA attention kernels)."""
    import torch
    patch_embed = 16 * (3 * 16 ** 2) * 192
    if method == "simmim":
        macs = patch_embed + _blocks_macs(17, 192, 12) + 16 * 192 * (3 * 16 ** 2)
    else:
        macs = patch_embed + _blocks_macs(5, 192, 12) + 5 * 192 * 512 + _blocks_macs(17, 512, 8) + 17 * 512 * (3 * 16 ** 2)
    model_flops = _load("bench_step").model_flops_per_image("vit_tiny_patch16", method, 64, torch.device("cpu"))
    assert model_flops == 2 * (3 * macs - patch_embed)


@pytest.mark.parametrize("arch, method, img", [("vit_tiny_patch16", "simmim", 64), ("vit_tiny_patch16", "mae", 64),
                                               ("vit_small_patch16", "mae", 96), ("vit_small_patch16", "simmim", 96)])
def test_the_models_own_flop_count_equals_torchs_flop_counter(arch, method, img):
    """A training run's tflops_per_gpu comes from the model's count (no second model, no counted
    step at start); bench_step's count is torch's FlopCounterMode over a real step (checked
    against the hand count above). Other widths, depths, grids and MAE's visible share."""
    import torch
    from mto_ds.models import create_mim_model, mask_fn_for
    model = create_mim_model(arch, method, img_size=img)
    mask_fn_for(model, method, img)
    counted = _load("bench_step").model_flops_per_image(arch, method, img, torch.device("cpu"))
    assert model.flops_per_image() == counted


def test_fused_attention_backward_counts_four_matmuls_not_the_recomputed_scores():
    """Flash and memory-efficient attention recompute Q K^T in their backward; torch's own formula
    counts it (5 matmuls), which is recomputation, not model work: ViT-L's count on a GPU came out
    0.5% above the hand count. The kernels' meta versions run here without a GPU."""
    import torch
    aten = torch.ops.aten
    step_flops = _load("bench_step").step_flops
    B, H, N, d = 2, 3, 17, 8
    q, k, v, grad = (torch.empty(B, H, N, d, device="meta") for _ in range(4))
    seed = torch.empty(2, dtype=torch.long, device="meta")

    def efficient():
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        aten._scaled_dot_product_efficient_attention_backward(grad, q, k, v, None, out, lse, seed, seed, 0.0,
                                                              [True, True, True, False])

    def flash():
        out, lse, cum_q, cum_k, max_q, max_k, seed_, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v)
        aten._scaled_dot_product_flash_attention_backward(grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0,
                                                          False, seed_, offset)

    one_matmul = 2 * B * H * N * N * d
    assert step_flops(efficient) == step_flops(flash) == (2 + 4) * one_matmul


@pytest.mark.parametrize("argv, named", [
    (["--gpus", "0"], "--gpus"), (["--images-per-sec-per-gpu", "-5"], "--images-per-sec-per-gpu"),
    (["--link-gbps", "0"], "--link-gbps"), (["--epochs", "0"], "--epochs"), (["--micro-batch", "0"], "--micro-batch"),
    (["--epochs", "inf"], "--epochs"),
    (["--arch", "vit_giant"], "vit_giant"), (["--dataset-size", "100"], "fewer than one global batch"),
    (["--gpus", "4096"], "smaller than the 4096 data-parallel ranks"),
    (["--reduce-bucket-size", "0.5"], "--reduce-bucket-size counts elements")])
def test_plan_run_refuses_bad_input_by_name_without_a_traceback_or_a_negative_plan(argv, named, capsys):
    """Zero GPUs or a zero link divided by zero, a negative rate printed negative hours, a data set
    smaller than a batch planned 0 steps, and a batch that does not split raised a traceback."""
    main = _load("plan_run").main
    with pytest.raises(SystemExit) as refused:
        main(["--images-per-sec-per-gpu", "450", *argv])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and named in err and "Traceback" not in err, err



def test_plan_run_takes_what_a_runs_config_says_and_flags_over_it(capsys, tmp_path):
    """--config: the arch, method, epochs, batch sizes and ZeRO settings of a run's YAML (here the
    ViT-L recipe: 800 epochs, 2048 in micro-batches of 128, ZeRO-1 without overlap_comm) plan what
    the same values as flags plan; a flag wins over the config; a config that does not load is
    named (exit 2)."""
    main = _load("plan_run").main
    rate = ["--gpus", "16", "--images-per-sec-per-gpu", "702.7", "--link-gbps", "400"]
    assert main(["--config", "configs/vit_l_simmim.yaml", *rate]) == 0
    by_config = capsys.readouterr().out.splitlines()
    assert main(["--arch", "vit_large_patch16", "--method", "simmim", "--epochs", "800", "--global-batch", "2048",
                 "--micro-batch", "128", "--zero", "1", *rate]) == 0
    by_flags = capsys.readouterr().out.splitlines()
    assert by_config[:4] == by_flags[:4] and by_config[-1] == by_flags[-1] == "  GPU-hours              455"
    assert "28.5 h with overlap_comm off (as configs/vit_l_simmim.yaml's deepspeed.config has it)" in by_config[4]
    assert main(["--config", "configs/vit_l_simmim.yaml", "--epochs", "400", "--zero", "3", *rate]) == 0
    overridden = capsys.readouterr().out.splitlines()
    assert "400 epochs" in overridden[0] and overridden[3].startswith("  ZeRO-3 traffic per step")
    assert "with overlap_comm on (as shipped)" in overridden[4]  # ZeRO-3's shipped file, not the config's ZeRO-1
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 10\n")
    with pytest.raises(SystemExit) as refused:
        main(["--config", str(tmp_path / "bad.yaml"), *rate])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and f"--config {tmp_path / 'bad.yaml'}: " in err and "train.epoch" in err


def test_plan_run_adds_the_communication_that_cannot_hide_behind_the_backward():
    """ds_configs/zero{1,2}_bf16.json do not overlap communication with compute (overlap_comm off;
    DeepSpeed's default for ZeRO-1), so the plan adds it to the step; ZeRO-3's does. With
    overlap_comm on, DeepSpeed reduces a bucket of reduce_bucket_size elements once the backward
    has filled it and the last bucket after the backward: with the shipped 5e8-element buckets a
    300M-parameter model's whole reduction comes after the backward (the plan had hidden it all,
    26.9 h instead of 28.5 h in BENCHMARKS' example). ZeRO-1/2's all-gather of the updated
    parameters follows the optimizer step and is always added; ZeRO-3's all-gathers are
    prefetched behind the compute. 64 GPUs, 32 images each at 1000 images/s: 32 ms compute, of
    which the backward 21.3 ms; 300M parameters in bf16 over a 400 Gb/s ring: 11.8 ms per
    all-gather or reduce-scatter."""
    plan_run = _load("plan_run")
    plan = plan_run.plan
    common = dict(params=300_000_000, epochs=1, dataset=2048 * 100, gpus=64, rate_per_gpu=1000.0,
                  global_batch=2048, micro_batch=32, link_gbps=400)
    compute, one_pass = 2048 / 64_000, 300e6 * 2 * 63 / 64 / 50e9
    backward = 2 / 3 * compute
    hours = lambda step_s: 100 * step_s / 3600  # 100 steps
    for zero in (1, 2):
        shipped = plan(zero=zero, **common)
        assert (shipped["overlap_comm"], shipped["reduce_bucket_size"]) == (False, 500_000_000)
        assert shipped["wall_hours"] == pytest.approx(hours(compute + 2 * one_pass))
        assert shipped["gpu_hours"] == pytest.approx(64 * shipped["wall_hours"])
        overlapped = plan(zero=zero, overlap_comm=True, **common)
        assert shipped["wall_hours_other"] == overlapped["wall_hours"]  # what the plan prints beside it
        assert overlapped["wall_hours_other"] == shipped["wall_hours"]
        # One bucket, filled by the backward's last gradient: nothing hides.
        assert overlapped["wall_hours"] == pytest.approx(shipped["wall_hours"])
        # Buckets of 1e8: the first two reduce during the backward, the third (a third of the
        # reduction) after it.
        assert plan(zero=zero, overlap_comm=True, reduce_bucket_size=100_000_000, **common)["wall_hours"] == \
            pytest.approx(hours(compute + one_pass / 3 + one_pass))
    # A slow link (40 Gb/s): the buckets queue behind each other from the first one's filling
    # (a third into the backward) on, and most of the reduction runs past the backward's end.
    slow = dict(common, link_gbps=40)
    left = backward / 3 + 10 * one_pass - backward
    assert plan(zero=1, overlap_comm=True, reduce_bucket_size=100_000_000, **slow)["wall_hours"] == \
        pytest.approx(hours(compute + left + 10 * one_pass))
    assert plan_run.reduction_left_after_backward(1.0, 300, 100, backward_s=3.0) == pytest.approx(1 / 3)
    # ZeRO-2 reduces at every micro-batch: 2 of 16 images per GPU, each leaving its own tail.
    tail = plan_run.reduction_left_after_backward(one_pass, 300_000_000, 100_000_000, backward / 2)
    assert tail > 0
    assert plan(zero=2, overlap_comm=True, reduce_bucket_size=100_000_000, **dict(common, micro_batch=16))[
        "wall_hours"] == pytest.approx(hours(compute + 2 * tail + one_pass))
    # ZeRO-3: the two all-gathers (23.6 ms) hide behind the compute, the reduction does not.
    zero3 = plan(zero=3, **common)
    assert zero3["overlap_comm"] is True
    assert zero3["wall_hours"] == pytest.approx(hours(compute + one_pass))
    assert plan(zero=3, overlap_comm=False, **common)["wall_hours"] == pytest.approx(hours(compute + 3 * one_pass))
    # ... unless they take longer than the compute (10x slower link): then the link sets the pace.
    assert plan(zero=3, **slow)["wall_hours"] == pytest.approx(hours(2 * 10 * one_pass + 10 * one_pass))


def test_bench_step_ends_on_sigterm_keeping_the_rows_it_finished(tmp_path):
    """BENCH_TIMEOUT's `timeout` sends SIGTERM. The engine rows install the trainer's stop handler,
    which only sets a flag; bench_step never read it, so a timed-out run went on to its last row."""
    import signal
    import time
    out = tmp_path / "rows.json"
    proc = subprocess.Popen([sys.executable, "tools/bench_step.py", "--tiny", "--method", "simmim", "--mto", "on", "off",
                             "--zero", "1", "2", "--data", "none", "--steps", "1", "--warmup", "1", "--json", str(out)],
                            cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("| simmim ZeRO-1 MTO on |"):  # an engine row is done: its handler is installed
                break
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) != 0, rest
    finally:
        proc.kill()
    assert time.monotonic() - sent < 60, rest
    names = [row["config"] for row in json.loads(out.read_text())["rows"]]
    assert names[:2] == ["baseline timm vit_tiny_patch16 SDPA, no DS, no MTO", "simmim ZeRO-1 MTO on"]
    assert "simmim ZeRO-2 MTO off" not in names and "stopped by SIGTERM" in rest, rest


def test_bench_gpu_timeout_kills_a_process_that_outlives_its_sigterm(tmp_path):
    """BENCH_TIMEOUT sends SIGTERM; a process that handles it and goes on (a stop handler, a hung
    CUDA call) held the lease until it ended. BENCH_KILL_AFTER seconds later it is killed."""
    import time
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\ntrap '' TERM\n[[ $1 == - || $1 == -c ]] && exit 0\nsleep 60\n")
    stub.chmod(0o755)
    env = cpu_env(BENCH_DRY_RUN="1", PYTHON=str(stub), BENCH_TIMEOUT="1", BENCH_KILL_AFTER="1")
    start = time.monotonic()
    result = subprocess.run(["bash", "tools/bench_gpu.sh", str(tmp_path / "out"), "kernel"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30, result.stdout
    assert result.returncode == 1 and "kernel_tests attention" in result.stderr, result.stderr
    commands = (tmp_path / "out" / "commands.txt").read_text()
    assert commands.count("exited with status 137") == 2, commands  # timeout's status for a KILL
