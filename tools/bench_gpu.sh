#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md on one GPU, each in its own process, written to
# OUT_DIR (tables as .md, rows as .json rewritten after every row, logs as .log). Parts, each
# meant to fit a job of about 10 minutes:
#
#   tools/bench_gpu.sh OUT_DIR kernel     # CUDA kernel tests (fused attention vs reference) + bench_attention
#   tools/bench_gpu.sh OUT_DIR large      # ViT-L/16 SimMIM + MAE, MTO on/off, ZeRO-1 and 2, batch 128, profiled
#   tools/bench_gpu.sh OUT_DIR compiled   # ViT-L/16 SimMIM, MTO off/on (both kernels), ZeRO-1, batch 128, train.compile
#   tools/bench_gpu.sh OUT_DIR huge       # ViT-H/14 SimMIM + MTO, ZeRO-3, activation checkpointing, batch 64 and 128
#   tools/bench_gpu.sh OUT_DIR all        # the four in order
#   tools/bench_gpu.sh OUT_DIR kernel huge  # several parts in one call: each runs once (kernel, quick's rows, large, compiled, huge)
#   tools/bench_gpu.sh OUT_DIR quick      # about 12 minutes (estimated, not yet run): CUDA tests of both statistics paths,
#                                         # bench_attention, ViT-L SimMIM + MAE ZeRO-1 with MTO off, on
#                                         # (fused kernel) and on (sdpa statistics) beside the plain timm
#                                         # and plain MAE baselines, profiled; the same
#                                         # rows' host floor (width 64); MAE with DeepSpeed's host-side
#                                         # options changed, and at batch 256; SimMIM + MAE with
#                                         # fp32 gradient accumulation
#   tools/bench_gpu.sh OUT_DIR trainer    # a check, not in `all`: `mto-ds pretrain` itself on the GPU, ViT-B/16
#                                         # SimMIM + MTO, 24 steps on the synthetic images, steps 16-18
#                                         # profiled; its rows (images/s, TFLOP/s, data wait, memory peaks)
#                                         # in trainer.md, its CUDA trace in trainer_run/profile/
#
# BENCH_TIMEOUT=SECONDS bounds each process (default: none), so a slow one cannot take the
# next ones' time: SIGTERM then, and SIGKILL BENCH_KILL_AFTER seconds later (default 30) if it
# has not ended (a hung CUDA call, a handler that outlives the signal). Needs torch with CUDA, timm, triton and deepspeed importable (pytest for
# `kernel`). BENCH_DRY_RUN=1 checks a part without a GPU, before a lease is spent on it: the
# kernel tests are collected, not run; bench_attention runs its CPU smoke shape; bench_step lists
# its rows and validates each engine row's DeepSpeed config (`--dry-run`).
# PYTHON=INTERPRETER picks the Python that runs everything (default: python3 on PATH).
set -euo pipefail
out=${1:?usage: tools/bench_gpu.sh OUT_DIR [PART...] (PART: kernel, large, compiled, huge, all, quick or trainer)}
parts=("${@:2}")
((${#parts[@]})) || parts=(all)
for part in "${parts[@]}"; do
    case $part in
        kernel | large | compiled | huge | all | quick | trainer) ;;
        *) echo "bench_gpu.sh: unknown part '$part': expected kernel, large, compiled, huge, all, quick or trainer" >&2
           exit 2 ;;
    esac
done
wants() {  # wants PART...: whether any of these parts was asked for; each part runs once however often it is named
    local asked wanted
    for asked in "${parts[@]}"; do
        for wanted in "$@"; do [[ $asked == "$wanted" ]] && return 0; done
    done
    return 1
}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

dry_run=${BENCH_DRY_RUN:-0}
step_flags=() pytest_flags=()
if [[ $dry_run == 1 ]]; then
    step_flags=(--dry-run) pytest_flags=(--collect-only)
elif ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench_gpu.sh: no CUDA device visible to $py; these measurements need one GPU" >&2
    exit 2
fi
{
    date -u +"%Y-%m-%dT%H:%MZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    "$py" - <<'EOF'
import importlib
for name in ("torch", "triton", "timm", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as err:
        print(name, "missing:", err)
EOF
} | tee "$out/env.txt"

failed=()
run() {  # run NAME CMD...: output to NAME.log, the table lines to NAME.md; a failure does not stop the next
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/commands.txt"
    set +e
    timeout --kill-after="${BENCH_KILL_AFTER:-30}" "${BENCH_TIMEOUT:-0}" "$@" 2>&1 | tee "$out/$name.log" \
        | grep -E '^(\||device|MTO overhead|speed vs|<!--|[0-9]+ (passed|failed)|[0-9/]+ tests? collected)' \
        | tee "$out/$name.md"
    local status=${PIPESTATUS[0]}
    set -e
    if ((status != 0)); then
        echo "== $name exited with status $status" | tee -a "$out/commands.txt"
        failed+=("$name")
    fi
}

if wants kernel all quick; then
    # The CUDA cases only: the interpreter cases are CPU work that CI runs anyway.
    run kernel_tests "$py" -m pytest -q -p no:cacheprovider tests/test_fused_attention.py tests/test_sdpa_stats.py \
        -rs -k "cuda or sm90" "${pytest_flags[@]}"
    run attention "$py" tools/bench_attention.py
fi
if wants quick; then
    # The rows that decide mto.kernel's default and show where MAE's step goes (host op tables).
    run vit_l_quick "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method simmim mae --mto on off \
        --mto-kernel auto sdpa --zero 1 --batch 128 --steps 10 --data none --profile "$out/profile_quick" \
        --json "$out/vit_l_quick.json"
    # The host floor: the same rows at width 64 (every block and parameter tensor, almost no GPU
    # work), so a step takes what the host needs to issue it. Set against the rows above, it says
    # whether a step is host- or GPU-bound; once without ZeRO-1's contiguous gradient buffer.
    run host_floor "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --width 64 --method simmim mae \
        --mto on off --mto-kernel auto sdpa --zero 1 --batch 8 --steps 10 --warmup 3 --data none \
        --json "$out/host_floor.json"
    run host_floor_noncontiguous "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --width 64 \
        --method simmim mae --mto off --zero 1 --batch 8 --steps 10 --warmup 3 --data none --no-baseline \
        --ds-set zero_optimization.contiguous_gradients=false --json "$out/host_floor_noncontiguous.json"
    # MAE's host side, each against the shipped config in the rows above: DeepSpeed's gradient
    # norm computed anyway (as before it was skipped without clipping), and ZeRO-1 without its
    # contiguous gradient buffer (one copy per gradient tensor instead of two; an all-reduce of
    # all gradients instead of a reduce to each rank's partition).
    for variant in compute_grad_norm=true contiguous_gradients=false; do
        run "mae_${variant%%=*}" "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method mae --mto off --zero 1 \
            --batch 128 --steps 10 --data none --no-baseline --ds-set "zero_optimization.$variant" \
            --json "$out/mae_${variant%%=*}.json"
    done
    # The ViT-L MAE recipe's micro-batch (256), chosen because 128 was host-bound.
    run mae_b256 "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method mae --mto on off --zero 1 \
        --batch 256 --steps 10 --data none --no-baseline --json "$out/mae_b256.json"
    # fp32 gradient accumulation (DeepSpeed's BF16 optimizer under ZeRO-1) against the shipped bf16
    # accumulation in the rows above: its time and memory. On one GPU nothing is all-reduced, so
    # communication_data_type=fp32 (twice a reduction's bytes) is not measured here.
    run fp32_grad_accum "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method simmim mae \
        --mto off --zero 1 --batch 128 --steps 10 --data none --no-baseline \
        --ds-set data_types.grad_accum_dtype=fp32 --json "$out/fp32_grad_accum.json"
fi
if wants large all; then
    run vit_l "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method simmim mae --mto on off \
        --zero 1 2 --batch 128 --steps 10 --profile "$out/profile_vit_l" --json "$out/vit_l.json"
fi
if wants compiled all; then
    run vit_l_compiled "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_large_patch16 --method simmim --mto on off \
        --mto-kernel auto sdpa --zero 1 --batch 128 --steps 10 --compile --data none --json "$out/vit_l_compiled.json"
fi
if wants huge all; then
    # One process per batch: a ZeRO-3 engine keeps its memory until its process ends. The plain
    # baseline (no activation checkpointing) runs at 64 only: at 128 it may not fit in 80 GB.
    run vit_h_b64 "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_huge_patch14 --method simmim --mto on --zero 3 \
        --batch 64 --activation-checkpointing --steps 10 --warmup 3 --data none --json "$out/vit_h_b64.json"
    run vit_h_b128 "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_huge_patch14 --method simmim --mto on --zero 3 \
        --batch 128 --activation-checkpointing --steps 10 --warmup 3 --data none --no-baseline \
        --json "$out/vit_h_b128.json"
    # Half the blocks recomputed (train.checkpoint_every=2): the recomputation's time against the
    # memory the other half keeps, at the batch the target names.
    run vit_h_b64_every2 "$py" tools/bench_step.py "${step_flags[@]}" --arch vit_huge_patch14 --method simmim --mto on \
        --zero 3 --batch 64 --activation-checkpointing 2 --steps 10 --warmup 3 --data none --no-baseline \
        --json "$out/vit_h_b64_every2.json"
fi
if wants trainer; then
    # The trainer's own CUDA paths (memory peaks, the profiler's CUDA trace, tflops_per_gpu) on a
    # short real start; the dry run makes the start's own checks (`pretrain --dry-run`).
    trainer_args=(--config configs/vit_b_simmim.yaml "run.output_dir=$out/trainer_run" run.progress_bar=false
                  run.log_every=4 run.profile_step=16 run.profile_steps=3 data.source=synthetic
                  data.synthetic_images=4096 data.num_workers=8 train.global_batch_size=64 train.steps=24
                  train.warmup_steps=4 checkpoint.every_steps=0 checkpoint.resume=none)
    if [[ $dry_run == 1 ]]; then
        run trainer bash -c '"$0" -m mto_ds pretrain "$@" --dry-run && echo "| trainer | config valid: would run mto_ds pretrain $* |"' \
            "$py" "${trainer_args[@]}"
    else
        run trainer_start "$py" -m mto_ds pretrain "${trainer_args[@]}"
        run trainer "$py" - "$out/trainer_run/metrics.jsonl" <<'EOF'
import json, sys
print("| step | images/s | TFLOP/s per GPU | data wait | GiB allocated / reserved |")
print("|---|---|---|---|---|")
for row in map(json.loads, open(sys.argv[1])):
    if "loss" in row:
        memory = (row["max_memory_allocated_gib"], row["max_memory_reserved_gib"])
        print(f"| {row['step']} | {row['images_per_sec']:.1f} | {row['tflops_per_gpu']:.1f} | "
              f"{100 * row['data_wait']:.1f}% | {' / '.join(f'{m:.1f}' for m in memory) if None not in memory else 'n/a'} |")
EOF
    fi
fi
if ((${#failed[@]})); then
    echo "bench_gpu.sh: exited with a non-zero status: ${failed[*]} (see $out/commands.txt and the .log files)" >&2
    exit 1
fi
