#!/usr/bin/env bash
# Runs N processes of the trainer on this machine, joined by jax.distributed over
# loopback (gloo collectives on CPU): a stand-in for a multi-host launch.
#
#   launch/local_multiprocess.sh 2 --config=configs/condseg_kvasir.py:demo --workdir=workdirs/mp
set -euo pipefail
N=${1:?number of processes}; shift
PORT=${PORT:-$((20000 + RANDOM % 10000))}
pids=()
for ((i = 0; i < N; i++)); do
  CONTRASTJAX_COORDINATOR=127.0.0.1:$PORT CONTRASTJAX_NUM_PROCESSES=$N \
  CONTRASTJAX_PROCESS_ID=$i python -m contrastjax.train "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
