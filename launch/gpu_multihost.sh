#!/usr/bin/env bash
# Start one idefics_jax process per host (or per GPU) with jax.distributed set up explicitly.
#
#   # on every host, with its own --process-id:
#   launch/gpu_multihost.sh --coordinator 10.0.0.1:12345 --num-processes 4 --process-id 0 -- \
#       python -m idefics_jax.train --config configs/sft.py --workdir /shared/run
#
#   # under Slurm (one task per host, or per GPU with --per-gpu): ids come from Slurm
#   srun --nodes=4 --ntasks-per-node=1 launch/gpu_multihost.sh -- python -m idefics_jax.train ...
#   srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/gpu_multihost.sh --per-gpu -- python ...
#
# The command reads IDEFICS_COORDINATOR / IDEFICS_NUM_PROCESSES / IDEFICS_PROCESS_ID
# (idefics_jax.distributed.initialize), which fails fast with a message when the hosts or their
# device counts do not match.
set -euo pipefail

coordinator="" num_processes="" process_id="" per_gpu=0 port=12345
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) coordinator="$2"; shift 2 ;;
    --num-processes) num_processes="$2"; shift 2 ;;
    --process-id) process_id="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_multihost.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "gpu_multihost.sh: no command given after --" >&2; exit 2
fi

if [[ -n "${SLURM_PROCID:-}" && -z "$process_id" ]]; then
  process_id="$SLURM_PROCID"
  num_processes="${SLURM_NTASKS:?SLURM_NTASKS is not set}"
  if [[ -z "$coordinator" ]]; then
    first_host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
    coordinator="${first_host}:${port}"
  fi
  if [[ "$per_gpu" == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="${SLURM_LOCALID:?SLURM_LOCALID is not set}"
  fi
fi

for name in coordinator num_processes process_id; do
  if [[ -z "${!name}" ]]; then
    echo "gpu_multihost.sh: --${name//_/-} is required outside Slurm" >&2; exit 2
  fi
done
if (( process_id < 0 || process_id >= num_processes )); then
  echo "gpu_multihost.sh: --process-id $process_id is outside 0..$((num_processes - 1))" >&2; exit 2
fi

export IDEFICS_COORDINATOR="$coordinator" IDEFICS_NUM_PROCESSES="$num_processes" IDEFICS_PROCESS_ID="$process_id"
echo "[gpu_multihost] process $process_id of $num_processes, coordinator $coordinator: $*" >&2
exec "$@"
