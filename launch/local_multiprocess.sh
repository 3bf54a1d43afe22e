#!/usr/bin/env bash
# Runs N processes of the trainer on this machine, joined by jax.distributed over
# loopback (gloo collectives on CPU): a stand-in for a multi-host launch.
#
#   launch/local_multiprocess.sh 2 --config=configs/condseg_kvasir.py:demo --workdir=workdirs/mp
#
# DRY_RUN=1 prints each process's command instead of running it.
set -euo pipefail
N=${1:?number of processes}; shift
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: the number of processes must be a positive integer, got '$N'" >&2
  exit 2
fi
PORT=${PORT:-$((20000 + RANDOM % 10000))}
PY=${PYTHON:-python}
pids=()
for ((i = 0; i < N; i++)); do
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "CONTRASTJAX_COORDINATOR=127.0.0.1:$PORT CONTRASTJAX_NUM_PROCESSES=$N" \
      "CONTRASTJAX_PROCESS_ID=$i $PY -m contrastjax.train $*"
    continue
  fi
  CONTRASTJAX_COORDINATOR=127.0.0.1:$PORT CONTRASTJAX_NUM_PROCESSES=$N \
  CONTRASTJAX_PROCESS_ID=$i $PY -m contrastjax.train "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]+"${pids[@]}"}"; do wait "$p" || status=$?; done
exit $status
