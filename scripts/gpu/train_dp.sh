#!/usr/bin/env bash
# Issue 7, data-parallel scaling on a 2-GPU machine, at most 4 minutes of wall clock
# (TRAIN_DP_BUDGET_S, default 210 s of steps + the tar): the SmolLM2-135M LoRA r16 step
# (bf16, 16 x 1024 per device) on 1 device, then on 2 (mesh data=2, global batch 32), tokens/s
# and the ratio (target >= 1.8x). Same trainer and jitted, sharded step as `jaxcompress train`.
#
#   export JAXCOMPRESS_DATA=$PWD/.data JAXCOMPRESS_GIT_COMMIT=<hash>; source scripts/gpu_prelude.sh
#   bash scripts/gpu/train_dp.sh            # kind nvidia-h100-x2 (or h200-x2); carry: .stage, .whl
#   bash scripts/gpu/train_dp.sh --smoke    # CPU: 2 fake devices, tiny batch
#
# Writes $OUT/train_dp/ (throughput_dp.{json,md}, step_dp.log, progress.log, gpu.txt) and ends
# with $OUT/train_dp.tgz. Record: tar -xzf train_dp.tgz; python scripts/train_results.py train_dp --to docs/results
set -u
AREA=train_dp
D=${OUT:?set OUT}/$AREA
mkdir -p "$D"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
START=$(date +%s)
DEADLINE=$((START + ${TRAIN_DP_BUDGET_S:-210}))
[ $SMOKE = 1 ] && DEADLINE=$((START + ${TRAIN_DP_BUDGET_S:-1200}))
export PYTHONPATH=${PYTHONPATH:-.}
# This machine's rule: NVLink multicast stays off (KINDS.md); XLA's all-reduce goes through NCCL.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=python3

source scripts/gpu/steps.sh

log "train_dp.sh start (smoke=$SMOKE); commit ${JAXCOMPRESS_GIT_COMMIT:-?}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4 | tee "$D/gpu.txt"
nvidia-smi topo -m > "$D/topo.txt" 2>&1
if [ $SMOKE = 1 ]; then
    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
    ARGS=(--batch 1 --seq-len 32 --warmup 1 --steps 2)
else
    ARGS=(--warmup 3 --steps 20)
fi
# TRAIN_DP_MODEL=random:smollm2-135m: the same shapes without the staged GGUF (throughput only).
[ -n "${TRAIN_DP_MODEL:-}" ] && ARGS+=(--model "$TRAIN_DP_MODEL")
step dp 0 100000 $PY scripts/train_throughput.py --cases dp-scaling "${ARGS[@]}" --out "$D/throughput_dp.json"
cat "$D/throughput_dp.md" 2>/dev/null | tee "$D/summary.txt"
tar -czf "$OUT/$AREA.tgz" -C "$OUT" "$AREA"
log "done: $OUT/$AREA.tgz"
