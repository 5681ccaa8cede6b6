#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node (srun, one task per node), each starting one
# training process per GPU of its node, all joining node 0's rendezvous.
#   sbatch accelerate_configs/slurm_multi_node.sh                          # recipes/lccc_base.yaml
#   sbatch --nodes 4 accelerate_configs/slurm_multi_node.sh recipes/lccc_base.yaml --learning_rate 1e-4
# Submit from the repository root, on storage every node sees: the output folder (checkpoints, resume) and the
# virtualenv must be shared. Before the time limit SLURM sends SIGTERM; the run saves a checkpoint and stops,
# and submitting the same job again resumes it. ACCELERATE_CONFIG picks another base config (e.g. a copy of
# multi_node.yaml with fsdp_qlora.yaml's FSDP settings); its node count, rank, address and sizes are
# overridden below from SLURM's allocation.
#SBATCH --job-name=lccc-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

RECIPE=${1:-recipes/lccc_base.yaml}
shift $(($# > 0 ? 1 : 0))
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
VENV=${VENV:-.venv}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_PROCESS_IP=${HOSTS[0]}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# On SIGTERM torchrun passes the signal on and kills the workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (30 by default): leave them the time SLURM gives (--signal=TERM@120) to finish the step and save a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
# Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on, or each node's launcher and its
# data loader workers get one CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

cd "${SLURM_SUBMIT_DIR:-.}"
echo "nodes: $SLURM_JOB_NODELIST; main process: $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT; $NUM_PROCESSES processes"

# SLURM_NODEID differs per node, so it is expanded inside each task (single quotes), not here.
# --kill-on-bad-exit: a node whose launcher fails ends the job at once instead of leaving the others waiting on a
# collective until NCCL's timeout. After SIGTERM a launcher may exit non-zero; the training processes pass a
# barrier after rank 0 has written the checkpoint (sft/train/trainer.py), so no launcher exits while it is being written.
export RECIPE ACCELERATE_CONFIG VENV MAIN_PROCESS_IP MAIN_PROCESS_PORT NUM_PROCESSES
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$VENV/bin/accelerate" launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
        sft/run.py --config "$RECIPE" "$@"
' slurm_multi_node "$@"
