#!/usr/bin/env bash
# The GPU checks of issue 11 in one command on a lent device (one H100/H200, nothing fetchable there):
# installs the wheels of bench/device/wheels.sh (carried as .whl), then runs the chosen parts (default: all,
# in this order), each under its own time limit, each writing its log to $OUT (or ./device-out):
#   train     bench.train, ViT-L/16 224 bf16 synthetic, P=1: bare loop, ours (ZeRO-2, micro-batch 128, no
#             activation checkpointing), ZeRO-3 (leaf blocks), compiled blocks at ZeRO-2 and ZeRO-3 (their 1st
#             step: the compile), ZeRO-3 without leaf blocks, with DeepSpeed's fetch sync, fused checks off,
#             the recipe's setting (micro-batch 64, checkpointing; its "vs bare" is against batch 128): the
#             goals' rows first, rows print as they end (a cut-off keeps them, a failed row says why);
#             a profile of one step per row with the GPU's busy share; the goals' rows and the cheap ones
#             first, the compiled ones (cold inductor compiles) last                     limit 240 s
#   stream    bench.train on the faces recipe (ViT-L 112 px, ZeRO-2 bf16, 85,742-class DistArc head, 8 loader
#             workers, or 2 when /dev/shm is under 1 GiB) end to end on synthetic JPEG shards  limit 70 s
#   memory    the same on in-memory batches (its own part: a stream part that ran out of time lost it)  limit 40 s
#   gpu       pytest -m gpu: the launcher on CUDA/NCCL (DistArc, CHEST, ZeRO-2 bf16) and the fused checks
#             and ZeRO-3 fetch path on CUDA against DeepSpeed's own (DS_ACCELERATOR=cuda)  limit 140 s
#   capacity  bench.capacity: the largest table on this GPU, in the order the issue asks: exact DistArc
#             (chunked; SGD as Partial FC, then AdamW), sampled DistArc at rate 0.1 (lazy SGD, then SGD),
#             then CHEST exact and sampled (chunked, SGD)                                 limit 70 s
# First a preflight (limit 60 s): a one-rank NCCL group all-reduces (NCCL_DEBUG=INFO in preflight.log); the
# run stops there if it cannot (every row but the bare loop needs it). The limits add to 560 s; each part's
# limit is also cut to what is left before a deadline 580 s after the start (DEVICE_DEADLINE_S), so one call
# fits its 600 s whatever the set-up took; what a cut-off call wrote to $OUT still comes back.
# Here:   bash bench/device/wheels.sh
# Device: run(command="bash bench/device/run.sh", carry=[".whl"], timeout_s=600)
# A part that runs out of time is cut off and the next one starts; TRAIN_S / STREAM_S / MEMORY_S / GPU_S /
# CAPACITY_S set the limits. DEVICE_SMOKE=1 PY=.venv/bin/python rehearses the whole flow on a CPU machine at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=5
PY=${PY:-python3}  # the device image's Python holds torch
if [ -d .whl ] && [ -z "${DEVICE_SMOKE:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  # DeepSpeed's and submitit's own imports, each only where the image lacks it (not to shadow the image's)
  for module in einops msgpack psutil cloudpickle packaging; do
    "$PY" -c "import $module" 2>/dev/null || { echo "installing $module"; "$PY" -m pip install -q --no-index \
      --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fallback/"$module"-*.whl; } \
      || { echo "fallback wheel install failed: $module"; exit 1; }
  done
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } \
  | tee "$OUT/device.txt"
df -h /dev/shm | tail -1 | tee -a "$OUT/device.txt"  # the stream part's loader workers pass batches through it
# the project's own modules too (torch differs from the one tested here: a failed import shows now, not per part)
"$PY" -c "import sys, torch, deepspeed, timm; import bench.train, bench.capacity, launch.__main__, train.main, tests.test_gpu; print('python', sys.version.split()[0], 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)" 2>&1 \
  | grep -v WARNING | tee -a "$OUT/device.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "the imports failed: see above"; exit 1; }

DEADLINE=${DEVICE_DEADLINE_S:-580}  # seconds after the script's start (SECONDS), inside the call's 600
part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 16))  # 15 s to stop after the signal
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name skipped: ${left}s left before the deadline"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "WARNING\|Warning\|return func" "$OUT/$name.log" | grep -E "^\||^#|passed|failed|skipped|error|Error|GPU busy" | head -80
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

# A one-rank process group on the device (NCCL on CUDA): if it cannot all-reduce, no row but the bare loop can run
preflight='import datetime, torch, torch.distributed as dist
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(0)
dist.init_process_group("nccl" if cuda else "gloo", init_method="tcp://127.0.0.1:29611", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=40))
t = torch.ones(4, device="cuda" if cuda else "cpu")
dist.all_reduce(t)
dist.barrier()
print("process group ok:", dist.get_backend(), float(t.sum()))
dist.destroy_process_group()'
NCCL_DEBUG=INFO timeout --kill-after=5 60 "$PY" -c "$preflight" > "$OUT/preflight.log" 2>&1
rc=$?
grep -E "process group ok|NCCL INFO (NCCL version|Channel|Init COMPLETE)|rror" "$OUT/preflight.log" | head -8 | tee -a "$OUT/device.txt"
[ "$rc" -eq 0 ] || { echo "the preflight failed (exit $rc): see $OUT/preflight.log"; tail -30 "$OUT/preflight.log"; exit 1; }

VITL=(--recipe vitl_imagenet_8gpu --world 1 --steps 8 --warmup 2 --profile zero.bf16=true)
FACES=(--recipe vitl_ms1mv2_faces --world 1 --steps 8 --warmup 2 --no-variants)
CLASSES=85742  # MS1MV2's identities
CAPACITY=(--start 1000000 --tolerance 0.05)
# one search per row, the rows of each command printed as they end (a cut-off keeps them): exact, sampled, CHEST
CAP_EXACT=(--heads distarc --sample-rates 1.0 --class-chunks 8192 --head-optimizers sgd,adamw)
CAP_SAMPLED=(--heads distarc --sample-rates 0.1 --class-chunks 0 --head-optimizers lazy_sgd,sgd)
CAP_CHEST=(--heads chest --sample-rates 1.0,0.1 --class-chunks 8192 --head-optimizers sgd)
SMALL=()
RECIPE_BATCH=64  # vitl_imagenet_8gpu's own micro-batch
ON_CUDA=(env DS_ACCELERATOR=cuda)  # the gpu tests' own processes too (tests/conftest.py defaults to cpu)
if [ -n "${DEVICE_SMOKE:-}" ]; then
  ON_CUDA=()  # a CPU rehearsal of the script: tiny sizes, same flow
  RECIPE_BATCH=2  # a variant's settings come after SMALL's: at 64 the row took most of the rehearsal's time
  SMALL=(model.name=vit_tiny_patch16_224 model.img_size=32 data.image_size=32 data.batch_size=2 --steps 2 --warmup 1)
  FACES+=(model.name=vit_tiny_patch16_224 data.batch_size=4 data.num_workers=2 --images 256 --steps 2 --warmup 1)
  CLASSES=1000
  CAPACITY=(--budget-gb 0.3 --start 10000 --tolerance 0.3)
  CAP_EXACT=(--heads distarc --sample-rates 1.0 --class-chunks 8192 --head-optimizers sgd)
  CAP_SAMPLED=(--heads distarc --sample-rates 0.1 --class-chunks 0 --head-optimizers lazy_sgd)
  CAP_CHEST=(--heads chest --sample-rates 0.1 --class-chunks 8192 --head-optimizers sgd)
else
  shm_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  if [ "${shm_mb:-0}" -lt 1024 ]; then  # 8 workers x 2 batches of 4.8 MB in flight: a 64 MB /dev/shm is a bus error
    echo "/dev/shm has ${shm_mb:-?} MB free: the stream part reads with 2 workers" | tee -a "$OUT/device.txt"
    FACES+=(data.num_workers=2 data.prefetch_factor=1)
  fi
fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train stream memory gpu capacity)
for name in "${parts[@]}"; do
  case $name in
    gpu) part gpu "${GPU_S:-140}" "${ON_CUDA[@]}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider ;;
    train) part train "${TRAIN_S:-240}" "$PY" -m bench.train "${VITL[@]}" \
        --variant "ZeRO-3:zero.stage=3" \
        --variant "recipe (micro-batch $RECIPE_BATCH, checkpointing):data.batch_size=$RECIPE_BATCH,model.grad_checkpointing=true" \
        --variant "fused grad checks off:zero.fused_grad_checks=false" \
        --variant "ZeRO-3, DeepSpeed's fetch sync:zero.stage=3,zero.stage3_skip_local_fetch_sync=false" \
        --variant "ZeRO-3, no leaf blocks:zero.stage=3,zero.stage3_leaf_blocks=false" \
        --variant "compile:model.compile=true" \
        --variant "ZeRO-3 + compile:zero.stage=3,model.compile=true" \
        data.batch_size=128 model.grad_checkpointing=false "${SMALL[@]}" ;;
    stream) part stream "${STREAM_S:-70}" "$PY" -m bench.train "${FACES[@]}" --data shards --classes $CLASSES ;;
    memory) part memory "${MEMORY_S:-40}" "$PY" -m bench.train "${FACES[@]}" --data synthetic data.num_classes=$CLASSES ;;
    capacity) part capacity "${CAPACITY_S:-70}" env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash -c "$(printf '%q ' "$PY" -m bench.capacity "${CAPACITY[@]}" "${CAP_EXACT[@]}"); \
        $(printf '%q ' "$PY" -m bench.capacity "${CAPACITY[@]}" "${CAP_SAMPLED[@]}"); \
        $(printf '%q ' "$PY" -m bench.capacity "${CAPACITY[@]}" "${CAP_CHEST[@]}")" ;;
    *) echo "unknown part $name (train, stream, memory, gpu, capacity)"; exit 2 ;;
  esac
done
