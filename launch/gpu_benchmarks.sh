#!/usr/bin/env bash
# One-shot GPU benchmark of contrastjax against the PyTorch references, for a lent
# single-GPU machine (BENCHMARKS.md, "GPU"). Run from the repository root:
#
#   OUT=results/ [PARTS="mit_b5 condseg ..."] bash launch/gpu_benchmarks.sh
#
# Needs the machine's own jax (CUDA), torch and transformers; wheels for the packages it
# may lack (ml_collections, grain, ...) can be put in .whl/ and are installed to a
# temporary folder ($SITE, default: a fresh mktemp -d) first. For the ConDSeg side by side, a checkout of
# github.com/Mengqi-Lei/ConDSeg in third_party/ConDSeg (not part of this repository).
# Every part runs in its own process under its own time limit and writes its JSON and
# log to $OUT as it goes, so a part that fails or runs out of time costs only itself.
#
# DRY_RUN=1 prints each part's command (and its time limit) instead of running it.
set -u
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT"
LOG="$OUT/gpu_benchmarks.log"
export PYTHONUNBUFFERED=1
# JAX shares the GPU with PyTorch in the side-by-side parts: allocate on demand.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The persistent compilation cache (outside $OUT, which comes back to the caller): a part
# rerun after its time limit loads what the first try compiled.
export CONTRASTJAX_COMPILATION_CACHE=${CONTRASTJAX_COMPILATION_CACHE:-/tmp/contrastjax_xla_cache}
PY=${PYTHON:-python3}

if [[ -z "${DRY_RUN:-}" ]] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${SITE:-$(mktemp -d)}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi

[[ -n "${DRY_RUN:-}${SMALL:-}" ]] || {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, jaxlib, flax, optax, torch, transformers; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
} >>"$LOG" 2>&1

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [[ -n "${DRY_RUN:-}" ]]; then echo "$name (limit ${limit}s): $(printf '%q ' "$@")"; return; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" >>"$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

# Parts to run, in this order. The default (gap mit_b5 condseg, ~8 min on an H200) fits one
# 10-minute call; the SiamSeg MiT-B5 steps compile for several minutes each, so run them in
# a call of their own: PARTS="siamseg_bf16_remat siamseg_f32" SIAMSEG_LIMIT=280. APC
# (ViT-B/16 at 384 against timm + torch's LSTM): PARTS="apc apc_bf16" (needs timm).
# CLIP (RN50 against open_clip): PARTS=clip (needs open_clip_torch).
#
# SMALL=1 runs every part at a small size on the CPU (the PyTorch sides too): a dry run
# of the whole script, commands, flags and JSON outputs included, on a machine without a
# GPU (tests/test_launchers.py runs it). PARTS=all selects every part.
PARTS=${PARTS:-gap mit_b5 condseg}
[[ $PARTS == all ]] && PARTS="gap mit_b5 condseg siamseg_f32 siamseg_bf16_remat clip apc apc_bf16"
SIAMSEG_BATCH=${SIAMSEG_BATCH:-6}
if [[ -n "${SMALL:-}" ]]; then
  DEV=cpu
  GAP_SIZE=(--n=16 --d=4 --t1_full=10 --t1_scalar=100 --nograd)
  MIT_SIZE=(--variant=b0 --image_size=64 --batch=1 --steps=1 --warmup=1)
  STEPS=(--steps=1 --warmup=1 --init=host --xla_opt_level=0)
  CONDSEG_SIZE=(--config=configs/condseg_kvasir.py:demo --config.batch_size=2
                --config.data.image_size=32)
  SIAMSEG_SIZE=(--config=configs/siamseg_loveda.py:demo --config.batch_size=2
                --config.data.image_size=64 --config.model.depthwise=auto)
  CLIP_SIZE=(--config=configs/clip_gap_coco.py --config.batch_size=4 --config.model.embed_dim=32
             "--config.model.image.layers=(1,1,1,1)" --config.model.image.width=16
             --config.model.image.heads=8 --config.model.image.image_size=64
             --config.model.text.vocab_size=100 --config.model.text.context_length=16
             --config.model.text.width=32 --config.model.text.layers=1
             --config.model.text.heads=2 --config.data.image_size=64
             --config.data.context_length=16 --config.data.max_vocab=100)
  APC_SIZE=(--config=configs/apc_voc.py:demo --config.batch_size=4 --config.apc.par=False
            --config.apc.eq_weight=0)
else
  DEV=cuda
  GAP_SIZE=()
  MIT_SIZE=(--variant=b5 --image_size=512 --batch=2 --steps=10 --warmup=3)
  STEPS=(--steps=10 --warmup=3 --init=host)
  CONDSEG_SIZE=(--config=configs/condseg_kvasir.py --config.batch_size=16
                --config.data.image_size=256)
  SIAMSEG_SIZE=(--config=configs/siamseg_loveda.py --config.batch_size=$SIAMSEG_BATCH)
  CLIP_SIZE=(--config=configs/clip_gap_coco.py --config.batch_size=${CLIP_BATCH:-256})
  APC_SIZE=(--config=configs/apc_voc.py --config.data.crop_size=384
            --config.batch_size=${APC_BATCH:-16})
fi
BENCH=($PY -m contrastjax.benchmark)
for p in $PARTS; do
  case $p in
    gap)  # The modality-gap simulator (float64) on the GPU against SciPy on the host CPU.
      part gap ${GAP_LIMIT:-150} $PY -m contrastjax.gap.benchmark --scipy_methods=RK45 \
        "${GAP_SIZE[@]}" --json_out="$OUT/gap.json" ;;
    mit_b5)  # MiT-B5 encoder forward + backward, 512x512, batch 2, vs transformers.
      part mit_b5 ${MIT_LIMIT:-170} $PY benchmarks/mit_encoder.py "${MIT_SIZE[@]}" \
        --json_out="$OUT/mit_b5.json" \
        --runs=${MIT_RUNS:-jax:float32:scan,torch:float32,jax:bfloat16:remat:scan,torch:bfloat16,jax:bfloat16:scan} ;;
    condseg)  # ConDSeg stage-2 train step, 256x256, batch 16, vs the reference on the GPU
              # (JAX alone when third_party/ConDSeg is not there).
      ref=()
      if [[ -d third_party/ConDSeg ]]; then
        ref=(--reference_dir=third_party/ConDSeg --reference_device=$DEV)
      else
        echo "condseg: no third_party/ConDSeg checkout, timing the JAX side alone" | tee -a "$LOG"
      fi
      part condseg ${CONDSEG_LIMIT:-110} "${BENCH[@]}" "${CONDSEG_SIZE[@]}" "${STEPS[@]}" \
        "${ref[@]}" --json_out="$OUT/condseg.json" ;;
    siamseg_f32)  # SiamSeg UDA step (MiT-B5 + DAFormer head, 4 backbone passes), 512x512,
                  # vs its PyTorch counterpart (benchmarks/siamseg_torch.py).
      part siamseg_f32 ${SIAMSEG_LIMIT:-140} "${BENCH[@]}" "${SIAMSEG_SIZE[@]}" "${STEPS[@]}" \
        --torch --reference_device=$DEV --json_out="$OUT/siamseg_b5_f32.json" ;;
    siamseg_bf16_remat)
      part siamseg_bf16_remat ${SIAMSEG_LIMIT:-140} "${BENCH[@]}" "${SIAMSEG_SIZE[@]}" \
        --config.model.dtype=bfloat16 --config.model.remat=True "${STEPS[@]}" \
        --torch --reference_device=$DEV --json_out="$OUT/siamseg_b5_bf16_remat.json" ;;
    clip)  # CLIP step (OpenCLIP RN50 + text Transformer), 224x224, vs OpenCLIP itself
           # (benchmarks/clip_torch.py).
      part clip ${CLIP_LIMIT:-150} "${BENCH[@]}" "${CLIP_SIZE[@]}" "${STEPS[@]}" \
        --torch --reference_device=$DEV --json_out="$OUT/clip_f32.json" ;;
    apc)  # APC one-stage step (ViT-B/16 + HV-BiLSTM + LargeFOV + losses), 384x384, vs
          # its PyTorch counterpart (benchmarks/apc_torch.py: timm ViT + torch LSTM).
      part apc ${APC_LIMIT:-150} "${BENCH[@]}" "${APC_SIZE[@]}" "${STEPS[@]}" \
        --torch --reference_device=$DEV --json_out="$OUT/apc_f32.json" ;;
    apc_bf16)  # the same in bfloat16 (torch: autocast) with remat on our side
      part apc_bf16 ${APC_LIMIT:-150} "${BENCH[@]}" "${APC_SIZE[@]}" \
        --config.model.dtype=bfloat16 --config.model.remat=True "${STEPS[@]}" \
        --torch --reference_device=$DEV --json_out="$OUT/apc_bf16.json" ;;
    *) echo "unknown part $p" | tee -a "$LOG"; exit 2 ;;
  esac
done
echo "done after ${SECONDS}s" | tee -a "$LOG"
