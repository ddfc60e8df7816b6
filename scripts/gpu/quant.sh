#!/usr/bin/env bash
# GPU runs of the weight-quantization records (issue 4). From the repository root on the GPU machine:
#
#   export JAXCOMPRESS_DATA=$PWD/.data JAXCOMPRESS_GIT_COMMIT=<hash>
#   source scripts/gpu_prelude.sh; bash scripts/gpu/quant.sh PART
#
# PART a: baseline, RTN, GPTQ (with and without act-order) and AWQ at W4/W3 g128 (~8 min);
# PART b: SqueezeLLM W4/W3, the sink-weighted GPTQ variant and the C4-calibrated GPTQ/AWQ cells (~9 min);
# PART c: the two W3 C4-calibrated cells that did not fit part b's time (~4 min);
# PART d: SqueezeLLM with the k-means++ start (dense and dense-and-sparse, W4 and W3) beside
#   per-channel RTN, the paper's own comparison (~8 min);
# PART e: GPTQ W4/W3 g128 with float32 scales (the published code's grid), for the comparison with
#   the reference implementation (docs/results/quant_reference_check.md) (~4 min);
# PART kv: WikiText-2 perplexity (all windows, no C4) with every KV-cache recipe (~3 min);
# PART 7b: GPTQ W4 g128 end-to-end time and peak memory on random:llama2-7b, 128 x 2048.
# Full protocol: WikiText-2 all 148 windows and C4 256 windows of 2048, fp32 SmolLM2,
# calibration 128 windows of 2048 (WikiText-2 train, seed 0; `@c4`: the C4 subset).
# Everything lands in $OUT/quant_PART/ and $OUT/quant_PART.tgz.
set -u
PART=${1:?part: a, b, c, d, e, kv or 7b}
OUT=${OUT:?set OUT}
D=$OUT/quant_$PART
mkdir -p "$D"
export PYTHONPATH=${PYTHONPATH:-.}
T0=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$D/progress.log"; }
log "quant part $PART, commit ${JAXCOMPRESS_GIT_COMMIT:-?}"
case $PART in
    a) CELLS=baseline,rtn_w4_g128,rtn_w3_g128,gptq_w4_g128,gptq_w3_g128,awq_w4_g128,awq_w3_g128,gptq_w4_g128_actorder,gptq_w3_g128_actorder ;;
    b) CELLS=squeezellm_w4,squeezellm_w3,gptq_w4_g128_sink,gptq_w4_g128@c4,awq_w4_g128@c4,gptq_w3_g128@c4,awq_w3_g128@c4 ;;
    c) CELLS=gptq_w3_g128@c4,awq_w3_g128@c4 ;;
    d) CELLS=squeezellm_w4,squeezellm_w4_sparse,squeezellm_w3,squeezellm_w3_sparse,rtn_w4_g128+weights.group_size=channel,rtn_w3_g128+weights.group_size=channel ;;
    e) CELLS=gptq_w4_g128+weights.scale_dtype=float32,gptq_w3_g128+weights.scale_dtype=float32 ;;
    kv) CELLS=kv_int8,kivi_k4v4,kvquant_4bit,kivi_k4v2,kivi_k2v4,kivi_k3v3,kvquant_3bit,kivi_k2v2,kvquant_2bit,kv_int4,kv_int2 ;;
    7b) CELLS= ;;
    *) echo "unknown part $PART" >&2; exit 2 ;;
esac
if [ -n "$CELLS" ]; then
    # record_quant always runs the baseline cell first (a check that each call reproduces it).
    # KV recipes leave the weights alone: no held-out layer errors; WikiText-2 only.
    [ "$PART" = kv ] && ARGS=(--c4-windows 0) || ARGS=(--layer-errors 8)
    timeout -k 5 ${QUANT_TIMEOUT_S:-560} python scripts/record_quant.py --recipes "${CELLS#baseline,}" \
        --out "$D" "${ARGS[@]}" 2>&1 | grep -v "^WARNING\|Warning" | tee "$D/record_quant.log"
    python scripts/record_quant.py --report "$D" > /dev/null
else
    timeout -k 5 ${QUANT_TIMEOUT_S:-560} python scripts/bench_gptq.py --model random:llama2-7b \
        --recipe gptq_w4_g128 --out "$D" 2>&1 | grep -v "^WARNING\|Warning" | tee "$D/bench_gptq.log"
fi
log "done"
tar -czf "$OUT/quant_$PART.tgz" -C "$OUT" "quant_$PART"
grep -h "wikitext2\|end to end" "$D"/*.log | tail -12
