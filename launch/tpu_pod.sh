#!/usr/bin/env bash
# Run the same idefics_jax command on every worker of a Cloud TPU VM pod (or multislice).
#
#   launch/tpu_pod.sh --tpu my-v5p-128 --zone us-east5-a [--project P] [--setup] -- \
#       python -m idefics_jax.train --config configs/pretrain_stage1.py --workdir gs://bucket/stage1 \
#       --config.data.dir=gs://bucket/data
#
# The workdir must be one that all workers see: a gs:// bucket (the workers' own credentials serve),
# or a shared filesystem at the same path on every worker. The data may be in a bucket as well.
# A preempted run (spot VMs: SIGTERM, or the metadata server's notice of a preemption or of a
# terminating maintenance) saves the step it reached and exits with 143; the same command resumes it.
#
# --setup first clones/updates this repository on every worker (REPO_URL, default: this checkout's
# origin) and installs it with pip. On a TPU pod jax.distributed finds the other workers by
# itself: the command runs with IDEFICS_AUTO_DISTRIBUTED=1, so idefics_jax.distributed.initialize()
# calls jax.distributed.initialize() and checks that every host sees the same number of chips.
set -euo pipefail

tpu="" zone="" project="" setup=0 repo_dir="idefics_jax"
repo_url="${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo-dir) repo_dir="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command given after --" >&2; exit 2; }
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 2; }

gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
[[ -n "$project" ]] && gcloud_args+=(--project "$project")

quoted=$(printf '%q ' "$@")
if [[ "$setup" == 1 ]]; then
  [[ -n "$repo_url" ]] || { echo "tpu_pod.sh: --setup needs REPO_URL" >&2; exit 2; }
  gcloud "${gcloud_args[@]}" --command "set -e; if [ -d $repo_dir ]; then git -C $repo_dir pull --ff-only; \
else git clone $repo_url $repo_dir; fi; cd $repo_dir && pip install -U 'jax[tpu]' && pip install -e '.[gcs]'"
fi
gcloud "${gcloud_args[@]}" --command "cd $repo_dir && IDEFICS_AUTO_DISTRIBUTED=1 $quoted"
