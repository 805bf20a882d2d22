#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM pod slice: the same command on every worker.
#
# Usage (arguments go to python -m cxrjax.main):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/evax_b.py --workdir=/mnt/shared/runs/evax_b [--config.key=value ...]
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT optional (gcloud's default otherwise)
#   REPO_DIR         the cxrjax checkout on the workers (default: ~/cxrjax)
#   CXRJAX_PYTHON    interpreter on the workers (default: python3)
#
# CXRJAX_DISTRIBUTED=1 makes cxrjax call jax.distributed.initialize() without arguments;
# JAX finds the slice's workers from the TPU metadata. --workdir must be a directory all
# workers share (Filestore/NFS, or a bucket mounted with gcsfuse): checkpoints are written
# collectively, each worker its own shards, and only worker 0 writes logs and metrics.
#
# Spot/preemptible slices: on the preemption notice (SIGTERM) every worker saves the same
# step (JAX's preemption sync point) and exits 0; run this script again when the slice is
# back and training resumes from that checkpoint ("Resuming from ..." in the log).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo_dir=${REPO_DIR:-'~/cxrjax'}
python=${CXRJAX_PYTHON:-python3}
args=$(printf ' %q' "$@")
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then project_flag=(--project="$PROJECT"); fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=all \
  --command="cd $repo_dir && CXRJAX_DISTRIBUTED=1 $python -m cxrjax.main$args"
