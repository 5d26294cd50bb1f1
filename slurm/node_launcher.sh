#!/bin/bash
# One torchrun or deepspeed launcher on this node, started by slurm/lib.sh as one srun task
# per node (MTO_LAUNCHER=torchrun|deepspeed). Arguments: the `mto_ds` command line
# (pretrain --config ... overrides). The launcher starts MTO_RANKS_PER_NODE ranks and
# gives them RANK/LOCAL_RANK/WORLD_SIZE, which the engine prefers to SLURM_* variables.
set -euo pipefail

# Slurm delivers a forwarded signal to every process of the step, this launcher included.
# Neither launcher survives USR1 (default action: terminate), and a dead launcher ends the
# step while its ranks are still saving the checkpoint. So the launcher ignores USR1 (the
# disposition is inherited through exec) and the ranks, which install their own handler,
# take it straight from Slurm. TERM: see each launcher below.
trap '' USR1

nnodes=$SLURM_JOB_NUM_NODES
node_rank=$SLURM_NODEID
case $MTO_LAUNCHER in
    torchrun)
        # torchrun handles TERM itself: TERM to its ranks, SIGKILL after 30 s.
        exec "$MTO_PYTHON" -m torch.distributed.run \
            --nnodes="$nnodes" --node-rank="$node_rank" --nproc-per-node="$MTO_RANKS_PER_NODE" \
            --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
            -m mto_ds "$@"
        ;;
    deepspeed)
        # Its runner has no TERM handler when it runs no pdsh: a TERM would end it, and with it
        # the step, at once, killing the ranks mid-save. It ignores TERM; its child launch.py
        # sets its own handler (TERM to the ranks, SIGKILL after 30 s).
        trap '' TERM
        # --no_ssh: every node runs its own launcher (no pdsh); the hostfile only tells it
        # the world layout. Written per node, so no shared scratch is assumed; named per node
        # too, so that nodes sharing TMPDIR never truncate a file another one is reading.
        hostfile=${TMPDIR:-/tmp}/mto_ds-hostfile-$SLURM_JOB_ID-$SLURM_STEP_ID-$node_rank
        scontrol show hostnames "$SLURM_JOB_NODELIST" |
            sed "s/\$/ slots=$MTO_RANKS_PER_NODE/" >"$hostfile"
        exec "$MTO_PYTHON" -m deepspeed.launcher.runner \
            --hostfile="$hostfile" --no_ssh --node_rank="$node_rank" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
            --no_local_rank --module mto_ds "$@"
        ;;
    *)
        echo "node_launcher.sh: MTO_LAUNCHER=$MTO_LAUNCHER: expected torchrun or deepspeed" >&2
        exit 2
        ;;
esac
