# shellcheck shell=bash
# Job mechanics behind slurm/pretrain.sbatch and slurm/sweep.sbatch; sourced by them, not
# run. The templates set the MTO_* parameters and the cluster environment, then call
# `mto_main "$@"`. Everything a cluster admin may want to change lives in the templates.
#
# Preemption and time limits (docs/SLURM.md has the whole story):
#   Slurm sends USR1 to the batch shell only (`--signal=B:USR1@T`, or by hand
#   `scancel --batch --signal=USR1 JOBID`; a USR1 sent to the ranks alone is acted on as
#   well, as state.json tells). The trap below forwards it to the training
#   step; srun delivers it to every process of the step, the engine's ranks finish the
#   current optimizer step, save a checkpoint together, write RUN_DIR/state.json and exit
#   0. Then, if state.json says the run is not finished, the job requeues itself
#   (`scontrol requeue`) up to MTO_MAX_RESTARTS times; the requeued job runs this same
#   script with SLURM_RESTART_COUNT+1 and the engine resumes from the newest complete
#   checkpoint (checkpoint.resume=auto).
#   TERM means cancel (scancel, the hard time limit, preemption by Slurm itself): it is
#   passed on too so the ranks can still try to checkpoint, but the job never requeues
#   itself after it; with PreemptMode=REQUEUE, Slurm requeues preempted jobs on its own.
#   TERM is not sent to srun, which answers a TERM of its own by killing its tasks
#   (SIGKILL, "forcing job termination"): `scancel --signal=TERM JOBID` has Slurm deliver
#   it to the processes of the job's steps, the batch shell excluded.

MTO_STEP_PID=""
MTO_SIGNALS=""      # signals the batch shell received, in order, e.g. " USR1 TERM"
MTO_NSIG=0
MTO_NFWD=0          # how many of them had been passed on to the training step
# Trap from the moment this file is sourced: a signal that finds no trap kills the shell.
trap 'mto_on_signal USR1' USR1
trap 'mto_on_signal TERM' TERM

mto_log() { printf '[mto_ds slurm %(%F %T)T] %s\n' -1 "$*"; }
mto_die() { mto_log "error: $*"; exit 2; }

# This job as scontrol and scancel must be told it. One element of an array job keeps the
# array's own id as its SLURM_JOB_ID, and that bare id names the whole array: requeueing or
# signalling it would act on every element. ARRAY_TASK names the element alone.
mto_job_ref() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        printf '%s_%s\n' "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID"
    else
        printf '%s\n' "$SLURM_JOB_ID"
    fi
}

mto_on_signal() {
    MTO_SIGNALS+=" $1"
    MTO_NSIG=$((MTO_NSIG + 1))
    if [[ -n $MTO_STEP_PID ]]; then
        mto_forward "$1"
    else
        mto_log "batch shell got SIG$1 before training started"
    fi
}

mto_forward() {
    MTO_NFWD=$MTO_NSIG
    if [[ $1 == TERM ]]; then
        local job
        job=$(mto_job_ref)
        mto_log "batch shell got SIGTERM: passing it to the training step's processes (scancel --signal=TERM)"
        scancel --signal=TERM "$job" || mto_log "scancel --signal=TERM $job failed"
    else
        mto_log "batch shell got SIG$1: forwarding it to the training step"
        kill -s "$1" "$MTO_STEP_PID" 2>/dev/null || true
    fi
}

# Run "$@" (an srun command) in the background so the traps fire while it runs (bash
# defers traps while a foreground command runs), and return its exit status.
mto_run_step() {
    local rc=0 r seen first=1
    "$@" &
    MTO_STEP_PID=$!
    # A signal between the caller's last look and the line above found no step to forward
    # to. Pass it on once the step has had time to install its handlers (a signal to srun or
    # a rank before that would kill it); a trap that fires meanwhile runs after the sleep.
    if ((MTO_NSIG > MTO_NFWD)); then
        sleep "${MTO_PENDING_SIGNAL_DELAY:-10}"
        mto_forward "${MTO_SIGNALS##* }"
    fi
    while :; do
        seen=$MTO_NSIG
        wait "$MTO_STEP_PID"
        r=$?
        # A repeated wait on a step that was already reaped answers 127: rc is its status.
        if ((!first && r == 127)) && ! kill -0 "$MTO_STEP_PID" 2>/dev/null; then break; fi
        rc=$r
        first=0
        # A trapped signal interrupts wait (status > 128) while the step runs on: wait again.
        ((MTO_NSIG == seen)) && break
    done
    MTO_STEP_PID=""
    return "$rc"
}

# Rendezvous for torch.distributed: the first node of the allocation, a port derived from
# the job id (array elements and jobs sharing a node get different ports), below Linux's
# ephemeral range (32768-60999) so no outgoing connection holds it. Same rule as
# mto_ds.engine.distributed.job_port.
mto_set_master() {
    # `|| true` and sed, not head: a failing scontrol must reach the message below, also under a
    # site's `set -euo pipefail` (head leaving a long list unread would fail the pipe too).
    MASTER_ADDR=${MTO_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sed -n 1p || true)}
    MASTER_PORT=${MTO_MASTER_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
    # An empty MASTER_ADDR would reach every rank, which would fail or hang one by one.
    [[ -n $MASTER_ADDR ]] || mto_die "cannot name the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST (scontrol show hostnames printed none): set MTO_MASTER_ADDR"
    export MASTER_ADDR MASTER_PORT
}

# Copy the dataset file to node-local storage once per node (skipped when a copy of the
# same size is already there, e.g. after a requeue onto the same node). Prints the path
# the ranks should read: the caller captures stdout, so every message goes to stderr.
mto_stage_data() {
    local src=$1 dir=$2
    [[ -f $src ]] || mto_die "MTO_DATA_PATH=$src is not a file (staging needs the .beton on shared storage)" >&2
    local dst
    dst="$dir/$(basename "$src")"
    mto_log "staging $src to $dst on each of $SLURM_JOB_NUM_NODES node(s)" >&2
    # Copy to a temporary name and rename, so a preempted copy never looks complete. The name
    # is the node's own: nodes that share the directory would otherwise rename each other's.
    # shellcheck disable=SC2016  # expanded by the remote bash
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --kill-on-bad-exit=1 bash -c '
            set -e; mkdir -p "$2"
            if [[ $(stat -c %s "$1") != $(stat -c %s "$3" 2>/dev/null) ]]; then
                part=$3.part.$SLURM_JOB_ID.$SLURM_NODEID
                cp "$1" "$part" && mv -f "$part" "$3"
            fi' _ "$src" "$dir" "$dst" >&2 || mto_die "staging $src to $dir failed" >&2
    printf '%s\n' "$dst"
}

# The srun command of the training step: one task per GPU (MTO_LAUNCHER=srun), or one
# torchrun / deepspeed launcher per node that starts SLURM_NTASKS_PER_NODE ranks.
mto_step_command() {
    local -n _cmd=$1
    shift
    local cpus=() srun_args
    read -r -a srun_args <<<"$MTO_SRUN_ARGS"
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    case $MTO_LAUNCHER in
        srun)
            # Ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; stale torchrun
            # variables from the submitting shell would override them.
            unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
            _cmd=(srun --kill-on-bad-exit=1 "${cpus[@]}" --cpu-bind="$MTO_CPU_BIND" "${srun_args[@]}"
                 "$MTO_PYTHON" -u -m mto_ds "$@")
            ;;
        torchrun | deepspeed)
            # Equal nodes (mto_main checked): SLURM_TASKS_PER_NODE is "8(x2)".
            local layout=${SLURM_TASKS_PER_NODE:-}
            local per_node=${SLURM_NTASKS_PER_NODE:-${layout%%(*}}
            [[ -n $per_node ]] || per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
            export MTO_LAUNCHER MTO_PYTHON MTO_RANKS_PER_NODE=$per_node
            # One task per node with all of the node's CPUs (the batch node's count: the nodes of
            # a GPU partition are alike); the launcher does not bind.
            _cmd=(srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES"
                 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --cpu-bind=none "${srun_args[@]}"
                 bash "$MTO_ROOT/slurm/node_launcher.sh" "$@")
            ;;
    esac
}

# "finished step total_steps reason" from RUN_DIR/state.json, or nothing if it is absent.
mto_read_state() {
    [[ -f $1/state.json ]] || return 0
    "$MTO_PYTHON" - "$1/state.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(str(bool(s.get("finished"))).lower(), s.get("step"), s.get("total_steps"), s.get("reason"))
EOF
}

# One line per start of the job in RUN_DIR/slurm_jobs.log: which job, which restart, where
# its log is. A run directory outlives its jobs; this is the map back to their logs.
mto_record_start() {
    local restart=$1 log
    mkdir -p "$MTO_RUN_DIR"
    # One record a line: an array job's id is also one of its elements' ids, and scontrol lists
    # every element under it; take this job's record. The path runs to the next " Key=" (spaces
    # allowed in it) or the end of the record.
    log=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null |
        sed -n "s/^JobId=$SLURM_JOB_ID .* StdOut=//p" | sed 's/ [A-Za-z][A-Za-z:]*=.*//') || true
    printf '%(%F %T)T job %s restart %s nodes %s (%s) log %s\n' -1 "$SLURM_JOB_ID" "$restart" \
        "$SLURM_JOB_NUM_NODES" "$SLURM_JOB_NODELIST" "${log:-?}" >>"$MTO_RUN_DIR/slurm_jobs.log"
    mto_log "job $SLURM_JOB_ID restart $restart (at most $MTO_MAX_RESTARTS) on $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST"
    mto_log "run dir $MTO_RUN_DIR; launcher $MTO_LAUNCHER; master $MASTER_ADDR:$MASTER_PORT"
}

# After the training step: done, requeue (USR1 and not finished), or fail.
mto_finish() {
    local rc=$1 restart=$2 finished='' step='' total='' reason=''
    # Exit status 2 is a config error of this start: a bad key, or the run directory held by
    # another live start (a duplicate sbatch). Another start would stop the same way, and a
    # state.json there is not this start's but the live one's, which may say finished or
    # "signal SIGUSR1" and would have this job exit 0 or requeue itself.
    if ((rc == 2)); then
        mto_log "training step stopped on a config error (exit status 2, named above); not requeueing"
        exit 2
    fi
    # `|| true`: no state.json is an answer, also under a site's `set -euo pipefail`.
    read -r finished step total reason < <(mto_read_state "$MTO_RUN_DIR") || true
    if [[ $finished == true ]]; then
        mto_log "run finished: step $step of $total"
        exit 0
    fi
    # USR1 means checkpoint and requeue, whether it reached this shell (--signal=B:USR1@T) or
    # only the ranks (--signal=USR1@T, `scancel --signal=USR1` without --batch): they say so.
    if [[ ($MTO_SIGNALS == *USR1* || $reason == "signal SIGUSR1") && $MTO_SIGNALS != *TERM* ]]; then
        if ((restart >= MTO_MAX_RESTARTS)); then
            mto_log "not requeueing: restart limit MTO_MAX_RESTARTS=$MTO_MAX_RESTARTS reached at step ${step:-?}"
            mto_log "to continue, submit again with MTO_RUN_DIR=$MTO_RUN_DIR"
            exit 3
        fi
        # Even if the step failed while saving, the requeued job resumes from the newest
        # complete checkpoint, so the job is worth another start.
        mto_log "checkpointed at step ${step:-?} of ${total:-?} (${reason:-no state.json}); requeueing as restart $((restart + 1))"
        local job
        job=$(mto_job_ref)
        scontrol requeue "$job" || mto_die "scontrol requeue $job failed"
        exit 0
    fi
    mto_log "run not finished (step ${step:-?} of ${total:-?}, ${reason:-no state.json}${MTO_SIGNALS:+, signals:$MTO_SIGNALS}); not requeueing"
    exit $((rc ? rc : 1))
}

mto_main() {
    cd "$MTO_ROOT" || mto_die "cannot enter MTO_ROOT=$MTO_ROOT"
    # Fail here, in one line of the job log, rather than in every rank after start-up.
    [[ -f $MTO_CONFIG ]] || mto_die "MTO_CONFIG=$MTO_CONFIG: no such file under $MTO_ROOT"
    [[ -z $MTO_DATA_PATH || -e $MTO_DATA_PATH ]] ||
        mto_die "MTO_DATA_PATH=$MTO_DATA_PATH does not exist on $(hostname -s): point it at your .beton"
    [[ -z $MTO_DATA_STAGE_DIR || -n $MTO_DATA_PATH ]] ||
        mto_die "MTO_DATA_STAGE_DIR needs MTO_DATA_PATH: the .beton to copy"
    case $MTO_LAUNCHER in
        srun) ;;
        torchrun | deepspeed)
            # The launchers start one number of ranks on every node: SLURM_TASKS_PER_NODE is
            # "8(x2)" for that, "4(x2),2" for an allocation of unequal nodes (--ntasks without
            # --ntasks-per-node), where SLURM_NTASKS / nodes would leave ranks out. Checked
            # before the data is staged to every node.
            [[ ${SLURM_TASKS_PER_NODE:-} != *,* ]] || mto_die "MTO_LAUNCHER=$MTO_LAUNCHER starts as many ranks on every node, and this allocation has SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE: submit with --ntasks-per-node, or use MTO_LAUNCHER=srun"
            ;;
        *) mto_die "MTO_LAUNCHER=$MTO_LAUNCHER: expected srun, torchrun or deepspeed" ;;
    esac
    # One rank per GPU. More would share a GPU (the engine maps local rank modulo the GPUs it
    # sees) and fail only later, in NCCL or out of memory.
    local ranks_per_node=${SLURM_NTASKS_PER_NODE:-}
    ranks_per_node=${ranks_per_node%%(*}
    if ((${SLURM_GPUS_ON_NODE:-0} > 0)) && [[ -n $ranks_per_node ]] && ((ranks_per_node > SLURM_GPUS_ON_NODE)); then
        mto_die "--ntasks-per-node=$ranks_per_node ranks on $SLURM_GPUS_ON_NODE GPU(s) per node: give each rank a GPU (--ntasks-per-node = --gpus-per-node)"
    fi
    local restart=${SLURM_RESTART_COUNT:-0}
    # Overrides, later ones win: the template's, MTO_OVERRIDES, then the script's arguments.
    local -a extra overrides
    read -r -a extra <<<"$MTO_OVERRIDES"   # split on spaces, no glob expansion
    extra+=("$@")
    local arg
    for arg in "${extra[@]}"; do
        [[ $arg == *=* ]] || mto_die "argument '$arg' is not a section.key=value override"
        # A run.output_dir given as an override moves the run: follow it.
        [[ $arg == run.output_dir=* ]] && MTO_RUN_DIR=${arg#run.output_dir=}
    done
    mto_set_master
    mto_record_start "$restart"

    overrides=("run.output_dir=$MTO_RUN_DIR")
    if [[ -n $MTO_DATA_PATH ]]; then
        local data=$MTO_DATA_PATH
        if [[ -n $MTO_DATA_STAGE_DIR ]]; then
            data=$(mto_stage_data "$MTO_DATA_PATH" "$MTO_DATA_STAGE_DIR") || exit 2
        fi
        overrides+=("data.path=$data")
    fi
    [[ -n $MTO_WORKERS_PER_GPU ]] && overrides+=("data.num_workers=$MTO_WORKERS_PER_GPU")
    overrides+=("${extra[@]}")
    local -a cmd
    mto_step_command cmd pretrain --config "$MTO_CONFIG" "${overrides[@]}"

    # state.json is this start's to write: one left by an earlier start must not speak for
    # it (a start that fails before the engine writes one would pass for finished).
    rm -f "$MTO_RUN_DIR/state.json"
    if [[ -n $MTO_SIGNALS ]]; then
        # Preemption (USR1) during staging or set-up: requeue without starting, as after a
        # checkpoint. If every start ends here, --time is shorter than the --signal lead time
        # (MTO_MAX_RESTARTS bounds the repeats).
        mto_log "got SIG${MTO_SIGNALS# } before training started; not starting it (every start ending here means --time is shorter than the --signal lead time)"
        mto_finish 0 "$restart"
    fi
    local rc=0
    mto_log "step: ${cmd[*]}"
    mto_run_step "${cmd[@]}" || rc=$?
    mto_log "training step exited with status $rc"
    mto_finish "$rc" "$restart"
}
