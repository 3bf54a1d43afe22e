#!/usr/bin/env bash
# Cloud TPU VM launcher: create (or reuse) a TPU VM / pod slice, copy this checkout to
# every worker, install contrastjax with jax[tpu], and run the same training command on
# all workers at once (jax.distributed.initialize() auto-detects the slice).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE -- \
#       python -m contrastjax.train --config=configs/condseg_kvasir.py --workdir=gs://BUCKET/run1
#
# Environment knobs:
#   TPU_VERSION   runtime image (default: v2-alpha-tpuv5-lite; use tpu-ubuntu2204-base for v4)
#   PROJECT       gcloud project (default: gcloud's configured one)
#   SPOT=1        create a spot/preemptible VM (SIGTERM on preemption -> checkpoint + exit;
#                 rerun this script with the same command to resume from the workdir)
#   COPY=git      clone REPO_URL@REF on the workers instead of copying this checkout
#   REPO_URL, REF used with COPY=git
#   DATA_DIR      exported as CONTRASTJAX_DATA_DIR on the workers (e.g. a mounted bucket)
#   DRY_RUN=1     print the gcloud and tar commands instead of running them (the VM is
#                 taken as not existing yet)
set -euo pipefail

if [[ $# -lt 5 || "$4" != "--" ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
NAME=$1; ZONE=$2; ACCEL=$3; shift 4
CMD="$*"
VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
GC="gcloud compute tpus tpu-vm"

if [[ -n "${DRY_RUN:-}" ]] || ! $GC describe "$NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  echo "creating TPU VM $NAME ($ACCEL, $VERSION) in $ZONE"
  run $GC create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" --version="$VERSION" \
      $PROJECT_FLAG ${SPOT:+--spot}
else
  echo "reusing TPU VM $NAME"
fi

if [[ "${COPY:-scp}" == "git" ]]; then
  : "${REPO_URL:?set REPO_URL for COPY=git}"
  run $GC ssh "$NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command \
    "rm -rf ~/contrastjax && git clone -q $REPO_URL ~/contrastjax && cd ~/contrastjax && git checkout -q ${REF:-main}"
else
  ROOT=$(cd "$(dirname "$0")/.." && pwd)
  TARBALL=${DRY_RUN:+/tmp/contrastjax.XXXX.tar.gz}
  TARBALL=${TARBALL:-$(mktemp /tmp/contrastjax.XXXX.tar.gz)}
  run tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude=workdirs -czf "$TARBALL" .
  run $GC scp "$TARBALL" "$NAME":~/contrastjax.tar.gz --zone="$ZONE" $PROJECT_FLAG --worker=all
  run $GC ssh "$NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command \
    "rm -rf ~/contrastjax && mkdir -p ~/contrastjax && tar -C ~/contrastjax -xzf ~/contrastjax.tar.gz"
  run rm -f "$TARBALL"
fi

# Same install and command on every worker; CONTRASTJAX_DISTRIBUTED=1 makes the trainer
# call jax.distributed.initialize() (arguments auto-detected on TPU slices).
run $GC ssh "$NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command "
  set -e; cd ~/contrastjax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -U pip && pip install -q -e '.[gcs]' 'jax[tpu]'
  export CONTRASTJAX_DISTRIBUTED=1 ${DATA_DIR:+CONTRASTJAX_DATA_DIR=$DATA_DIR}
  $CMD"
