#!/usr/bin/env bash
# GPU run of the fused low-bit matmul kernels (issue 5): correctness tests, kernel benchmark,
# end-to-end decode. Run from the repository root on the GPU machine:
#
#   export JAXCOMPRESS_DATA=$PWD/.data JAXCOMPRESS_GIT_COMMIT=<hash>
#   source scripts/gpu_prelude.sh; bash scripts/gpu/kernels.sh
#
# Carry: .whl (pytest wheels, for machines without pytest). Everything goes to $OUT/kernels/ and
# $OUT/kernels.tgz. Whole run: at most KERNELS_BUDGET_S seconds (default 420; the GPU tests
# KERNELS_TEST_S, default 55; the benchmark at most KERNELS_BENCH_MAX_S, default 230): each step
# has its own `timeout`, so a hang loses only that step. KERNELS_TEST_S=0 skips the tests;
# KERNELS_DECODE_BATCHES (default 1,8,32) sets the end-to-end batches. Progress lines carry a UTC time and the seconds
# since the start.
set -u
OUT=${OUT:?set OUT}
D=$OUT/kernels
mkdir -p "$D"
T0=$(date +%s)
BUDGET=${KERNELS_BUDGET_S:-420}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$D/progress.log"; }
export JAX_PLATFORMS=cuda PYTHONPATH=${PYTHONPATH:-.}
export XLA_PYTHON_CLIENT_PREALLOCATE=false

log "start: budget ${BUDGET}s, commit ${JAXCOMPRESS_GIT_COMMIT:-?}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$D/gpu.txt" 2>&1
cat "$D/gpu.txt"

# 1. Correctness on the GPU (poisoned outputs, every code path incl. dequant=inplace / acc2d).
if ! python -c "import pytest" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/site_pytest .whl/pytest-*.whl \
        .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/pygments-*.whl > "$D/pip.log" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/site_pytest
fi
TEST_S=${KERNELS_TEST_S:-55}
if [ "$TEST_S" -gt 0 ]; then
    log "pytest tests/gpu/test_quant_matmul_gpu.py (timeout ${TEST_S}s)"
    timeout -k 5 "$TEST_S" python -m pytest -v -p no:cacheprovider tests/gpu/test_quant_matmul_gpu.py \
        > "$D/pytest_gpu.log" 2>&1
    echo "rc=$?" >> "$D/pytest_gpu.log"
    grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" "$D/pytest_gpu.log" | tail -25
fi
log "pytest done"

# 2. Kernel benchmark, suite run3 (KERNELS_SUITE): W4 g128 every shape at batch 1, then 2-8, 16-32,
#    then W8/W3/W2 at batch 1, then large batches and the rest, until the deadline. run3-rest starts
#    at batch 16-32 (the H100 run 4 covered W4 batch 1-8).
BENCH_S=$(( $(left) - 185 ))   # keep ~185 s for the decode runs and the summary
BENCH_MAX=${KERNELS_BENCH_MAX_S:-230}
[ "$BENCH_S" -gt "$BENCH_MAX" ] && BENCH_S=$BENCH_MAX
DEADLINE=$(( BENCH_S - 40 ))   # the sweep stops starting points 40 s before the hard timeout
log "bench_kernels --suite ${KERNELS_SUITE:-run3} (deadline ${DEADLINE}s, timeout ${BENCH_S}s)"
timeout -k 5 "$BENCH_S" python scripts/bench_kernels.py --out "$D" --suite "${KERNELS_SUITE:-run3}" \
    --deadline-s "$DEADLINE" --max-candidates 6 > "$D/bench_kernels.log" 2>&1
echo "rc=$?" >> "$D/bench_kernels.log"
grep -E "INVALID|failed|Error|rc=" "$D/bench_kernels.log" | head -20
log "bench done"

# 3. End to end: decode tokens/s, random Llama-2-7B, bf16 vs RTN W4 g128, batch 1, 8, 32.
#    Short context (512) so the weights, not the KV cache, dominate the bytes of a step.
#    linear() dispatches by the tuning table just measured (user cache = this run's table).
export JAXCOMPRESS_TUNING_CACHE=$D/quant_matmul_tuning.json
#    KERNELS_DECODE_FUSE="plain fused" also runs each recipe with q|k|v and gate|up fused.
RUNS=()
for recipe in bf16 rtn_w4_g128; do
    for fuse in ${KERNELS_DECODE_FUSE:-plain}; do RUNS+=("$recipe:$fuse"); done
done
i=0
for run in "${RUNS[@]}"; do
    recipe=${run%%:*} fuse=${run##*:}
    name=$recipe; [ "$fuse" = fused ] && name=${recipe}_fused
    T=$(( ($(left) - 10) / (${#RUNS[@]} - i) )); i=$(( i + 1 ))
    if [ "$T" -lt 20 ]; then log "no time left for decode $name"; continue; fi
    args=(--model random:llama2-7b --batches "${KERNELS_DECODE_BATCHES:-1,8,32}" --context 512 --steps 16 --skip-prefill
          --out "$D/decode_$name.json")
    [ "$recipe" != bf16 ] && args+=(--recipe "$recipe")
    [ "$fuse" = fused ] && args+=(--fuse-projections)
    log "bench_decode $name (timeout ${T}s)"
    timeout -k 5 "$T" python scripts/bench_decode.py "${args[@]}" > "$D/decode_$name.log" 2>&1
    echo "rc=$?" >> "$D/decode_$name.log"
    tail -6 "$D/decode_$name.log"
done
log "decode done"

# 4. Summary (JSON + table), printed last.
python - "$D" <<'EOF' 2>&1 | tee "$D/summary.txt"
import glob, json, os, sys
d = sys.argv[1]
recs = []
for f in glob.glob(os.path.join(d, "quant_matmul_*.json")):
    if not f.endswith(("_meta.json", "_tuning.json")):
        recs = json.load(open(f))
summary = {"w4_g128": [], "batch1_other_bits": [], "invalid": [], "decode": {}}
for r in recs:
    key = (r.get("variant"), r.get("kind"))
    row = {k: r.get(k) for k in ("bits", "group_size", "m", "k", "n", "kernel_us", "xla_bf16_us", "speedup",
                                 "roofline_fraction", "probe_us", "kernel_unhinted_us", "kernel_wall_us", "xla_bf16_wall_us",
                                 "rel_err", "floor_us", "bf16_floor_us", "xla_bf16_launches_per_call")}
    row["config"] = r.get("config")
    if r.get("invalid") or r.get("error"):
        summary["invalid"].append({**row, "why": r.get("invalid") or r.get("error")})
    elif key in (("w4_g128_sym", "a16"), ("w4_g128_asym", "a16")):
        row["variant"] = r["variant"]
        summary["w4_g128"].append(row)
    elif r.get("m") == 1 and r.get("kind") == "a16":
        summary["batch1_other_bits"].append({**row, "variant": r["variant"]})
dec = {}
for name in ("bf16", "rtn_w4_g128", "bf16_fused", "rtn_w4_g128_fused"):
    p = os.path.join(d, f"decode_{name}.json")
    if os.path.exists(p):
        dec[name] = {row["batch"]: row for row in json.load(open(p))["decode"]}
for suffix in ("", "_fused"):
    bf16, w4 = dec.get("bf16" + suffix, {}), dec.get("rtn_w4_g128" + suffix, {})
    for b in sorted(set(bf16) & set(w4)):
        summary["decode"][f"batch{b}{suffix}"] = {
            "bf16_tok_s": bf16[b]["tokens_per_s"], "w4_tok_s": w4[b]["tokens_per_s"],
            "w4_over_bf16": w4[b]["tokens_per_s"] / bf16[b]["tokens_per_s"]}
for b in sorted(set(dec.get("bf16", {})) & set(dec.get("rtn_w4_g128_fused", {}))):
    summary["decode"][f"batch{b}_w4_fused_over_bf16_plain"] = (
        dec["rtn_w4_g128_fused"][b]["tokens_per_s"] / dec["bf16"][b]["tokens_per_s"])
json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
with open(os.path.join(d, "candidates_w4_batch1.txt"), "w") as fh:  # every candidate's time, batch 1
    for r in recs:
        if r.get("variant") == "w4_g128_sym" and r.get("m") == 1 and r.get("candidates"):
            fh.write(f"{r['k']}x{r['n']} probe_us={r.get('probe_us')} breakdown={r.get('kernel_breakdown_us')}\n")
            for c in r["candidates"]:
                fh.write(f"   {json.dumps(c['config'], separators=(',', ':'))} wall={c.get('wall_us')} "
                         f"device={c.get('device_us')} {c.get('error', '')}\n")
f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
print("\nW4 g128 (kernel = CUPTI us/call; probe = same grid, loads only)")
print("| variant | K x N | M | kernel us | bf16 us | speedup | roofline | probe us | unhinted us | config |")
for r in sorted(summary["w4_g128"], key=lambda r: (r["variant"], r["m"], r["k"], r["n"])):
    c = r["config"] or {}
    cfg = (f"{'dot' if c.get('use_dot') else c.get('dequant')}{'-acc2d' if c.get('acc2d') else ''}"
           f"{'-pf' if c.get('prefetch') else ''} bn{c.get('block_n')} s{c.get('split_k')} t{c.get('tiles_per_step')} w{c.get('num_warps')}")
    print(f"| {r['variant']} | {r['k']}x{r['n']} | {r['m']} | {f(r['kernel_us'])} | {f(r['xla_bf16_us'])} | {f(r['speedup'], 2)} | "
          f"{f(r['roofline_fraction'], 2)} | {f(r['probe_us'])} | {f(r.get('kernel_unhinted_us'))} | {cfg} |")
for r in summary["batch1_other_bits"]:
    print(f"| {r['variant']} | {r['k']}x{r['n']} | 1 | {f(r['kernel_us'])} | {f(r['xla_bf16_us'])} | {f(r['speedup'], 2)} | "
          f"{f(r['roofline_fraction'], 2)} | {f(r['probe_us'])} | {f(r.get('kernel_unhinted_us'))} | |")
print(f"invalid/failed points: {len(summary['invalid'])}")
for r in summary["invalid"][:8]:
    print("  ", r["k"], r["n"], r["m"], str(r["why"])[:160])
print("decode tok/s (random:llama2-7b, context 512):", json.dumps(summary["decode"]))
EOF
log "end"
tar -czf "$OUT/kernels.tgz" -C "$OUT" kernels
