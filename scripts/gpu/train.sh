#!/usr/bin/env bash
# Issue 7 on one GPU (H200 capped to an H100's 80 GB for the throughput cases), at most 8 minutes
# of wall clock (TRAIN_BUDGET_S, default 450 s of steps + the summary and the tar):
#   (a) recovery: SmolLM2-135M dense and W3 g128 RTN WikiText-2 perplexity (148 windows of 2048,
#       fp32 evaluation), LoRA r16 on the W3 base (bf16 compute, fp32 adapters and Adam state) on
#       Alpaca + C4 text (configs/train/recovery_w3_r16.yaml, training loop capped at
#       TRAIN_SECONDS, default 75 s after compilation), perplexity after (as trained, and merged + re-quantized);
#       TensorBoard events, log.jsonl and a PNG of the loss / held-out curve;
#   (b) throughput: SmolLM2-135M LoRA r16 (bf16, 16 x 1024) and random:llama2-7b QLoRA r16 on a
#       W4 g64 base (1 x 2048; then 2 x 2048 if time is left), tokens/s and peak device memory;
#   (a') if time is left: the recovery run again on a GPTQ W3 g128 base (recovery_gptq/).
#
#   export JAXCOMPRESS_DATA=$PWD/.data JAXCOMPRESS_GIT_COMMIT=<hash>; source scripts/gpu_prelude.sh
#   bash scripts/gpu/train.sh               # carry: .stage (SmolLM2 GGUF halves), .whl (gguf wheel)
#   bash scripts/gpu/train.sh --smoke       # CPU: the same steps at tiny sizes (a few minutes)
#
# Writes $OUT/train/ and ends with $OUT/train.tgz:
#   recovery/recovery.{json,md}, recovery/recovery_curve.png, recovery/run/{tensorboard/,log.jsonl,results.json}
#   throughput_smollm2.{json,md}, throughput_llama2_7b*.{json,md}
#   step_*.log (what each step printed), step_*.rc, progress.log, gpu.txt
# Record in the repository: tar -xzf train.tgz; python scripts/train_results.py train --to docs/results
set -u
AREA=train
D=${OUT:?set OUT}/$AREA
mkdir -p "$D"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
START=$(date +%s)
DEADLINE=$((START + ${TRAIN_BUDGET_S:-450}))
[ $SMOKE = 1 ] && DEADLINE=$((START + ${TRAIN_BUDGET_S:-3000}))
export PYTHONPATH=${PYTHONPATH:-.}
# Identical programs (the W3 base before training and the re-quantized one after) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcompress-jax-cache-train}
PY=python3

STEP_SCALE=1
[ $SMOKE = 1 ] && STEP_SCALE=8  # a shared CPU is far slower than the GPU
source scripts/gpu/steps.sh

log "train.sh start (smoke=$SMOKE); commit ${JAXCOMPRESS_GIT_COMMIT:-?}; budget $(( DEADLINE - START ))s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2 | tee "$D/gpu.txt"

# An H100 80 GB gives JAX about 77.5 GB (95% of 81,559 MiB); on a larger card the throughput
# cases get the same (XLA_PYTHON_CLIENT_MEM_FRACTION), so "fits one H100" is tested, not assumed.
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
H100_FRACTION=""
H100=(env)
if [ -n "$TOTAL_MIB" ] && [ "$TOTAL_MIB" -gt 0 ]; then
    H100_FRACTION=$($PY -c "print(f'{min(0.95, 0.95 * 81559 / $TOTAL_MIB):.3f}')")
    H100=(env XLA_PYTHON_CLIENT_MEM_FRACTION=$H100_FRACTION)
    log "device memory ${TOTAL_MIB} MiB; throughput cases capped at fraction $H100_FRACTION (~77.5 GB)"
fi

# --- (a) recovery
if [ $SMOKE = 1 ]; then
    REC_ARGS=(--set steps=3 --set epochs=null --set batch_size=2 --set data.seq_len=64 --set data.eval_examples=4
              --set log.every=1 --set log.eval_every=2 --seqlen 64 --limit 2 --batch-size 2 --train-seconds 600)
else
    REC_ARGS=(--train-seconds "${TRAIN_SECONDS:-75}")
fi
step recovery 140 330 $PY scripts/train_recovery.py --config configs/train/recovery_w3_r16.yaml \
    --out "$D/recovery" "${REC_ARGS[@]}"
# Weights are not brought back (only the events, logs and results).
rm -rf "$D/recovery/run/final" "$D/recovery/run/checkpoints"

# --- (b) throughput (synthetic tokens; 3 warm-up steps, then the timed ones)
if [ $SMOKE = 1 ]; then
    TP_SMOL=(--batch 1 --seq-len 32 --warmup 1 --steps 2)
    TP_7B=(--tiny --warmup 1 --steps 2)
    TP_7B2=(--tiny --batch 2 --warmup 1 --steps 2)
else
    TP_SMOL=(--warmup 3 --steps 20)
    TP_7B=(--warmup 2 --steps 6)
    TP_7B2=(--batch 2 --warmup 2 --steps 6)
fi
step tp_smollm2 100 75 "${H100[@]}" $PY scripts/train_throughput.py --cases smollm2-lora "${TP_SMOL[@]}" \
    --out "$D/throughput_smollm2.json"
step tp_llama2_7b 0 120 "${H100[@]}" $PY scripts/train_throughput.py --cases llama2-7b-qlora "${TP_7B[@]}" \
    --out "$D/throughput_llama2_7b.json"
if [ "$(cat "$D/step_tp_llama2_7b.rc")" = "0" ]; then  # a larger batch, if it fits the time and the 80 GB
    step tp_llama2_7b_b2 0 120 "${H100[@]}" $PY scripts/train_throughput.py --cases llama2-7b-qlora "${TP_7B2[@]}" \
        --out "$D/throughput_llama2_7b_b2.json"
fi

# --- (a') the same recovery on a GPTQ W3 g128 base, only with the time that is left (the
# partial recovery.json keeps whatever perplexities finished)
if [ $SMOKE = 0 ]; then
    step recovery_gptq 0 240 $PY scripts/train_recovery.py --config configs/train/recovery_w3_r16.yaml \
        --set recipe=gptq_w3_g128 --out "$D/recovery_gptq" --train-seconds "${TRAIN_SECONDS_GPTQ:-60}"
    rm -rf "$D/recovery_gptq/run/final" "$D/recovery_gptq/run/checkpoints"
fi

# --- summary
log "summary"
{
    for f in "$D"/step_*.rc; do echo "$(basename "$f" .rc): rc=$(cat "$f")"; done
    echo
    cat "$D/recovery/recovery.md" 2>/dev/null || echo "(no recovery.md)"
    [ -f "$D/recovery_gptq/recovery.md" ] && { echo; cat "$D/recovery_gptq/recovery.md"; }
    echo
    for f in "$D"/throughput_*.md; do [ -f "$f" ] && head -n 4 "$f" | tail -n +3; done
    ls "$D"/throughput_*.md > /dev/null 2>&1 && echo "(| case | model | mode | devices | batch x seq | ms/step | tokens/s | tokens/s/device | peak GiB |)"
} | tee "$D/summary.txt"
tar -czf "$OUT/$AREA.tgz" -C "$OUT" "$AREA"
log "done: $OUT/$AREA.tgz ($(du -h "$OUT/$AREA.tgz" | cut -f1))"
