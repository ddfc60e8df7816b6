# The wgmma W4 kernel at large batches (kernel_notes run 17): the GPU test cases of `gemm_config`
# and a few decode cases (GEMM_TESTS, pytest node ids; "" skips), then the probe at batches
# GEMM_BATCHES on GEMM_SHAPES for the configs GEMM_CONFIGS, beside XLA's bf16 dot and the
# dequantize-then-dot that linear() ran past WGMMA_MAX_M. Logs under $OUT/$GEMM_DIR.
export JAXCOMPRESS_GIT_COMMIT=${JAXCOMPRESS_GIT_COMMIT:?set it to the commit under test} XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda PYTHONPATH=. PYTHONUNBUFFERED=1
D=$OUT/${GEMM_DIR:-gemm}; mkdir -p $D
nvidia-smi --query-gpu=name --format=csv,noheader
T=tests/gpu/test_wgmma_matmul_gpu.py
if [ -n "${GEMM_TESTS-16 17 18 0}" ]; then
  ids=""; for c in ${GEMM_TESTS-16 17 18 0}; do ids="$ids $T::test_kernel_matches_float64_reference[$c]"; done
  timeout -k 5 ${GEMM_TEST_S:-200} python -m pytest -q $ids $T::test_linear_dispatches_to_the_kernel_at_every_batch > $D/pytest.log 2>&1
  echo "pytest rc=$?"; tail -3 $D/pytest.log
fi
timeout -k 5 ${GEMM_PROBE_S:-300} python scripts/gpu/wgmma_w4_probe.py --out $D/probe.json --grids ${GEMM_GRIDS:-sym} \
  --shapes ${GEMM_SHAPES:-4096x14336,4096x4096,14336x4096,4096x1024} --batches ${GEMM_BATCHES:-128,256} \
  --configs "${GEMM_CONFIGS:-default}" --deadline-s $(( ${GEMM_PROBE_S:-300} - 40 )) > $D/probe.log 2>&1
echo "probe rc=$?"; sed -n '/^grid /,$p' $D/probe.log
python - $D/probe.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["records"]:
    head = f"{r['k']}x{r['n']} m={r['m']} bf16={r.get('xla_bf16_us', 0):.1f} deq+dot={r.get('dequant_dot_us') or 0:.1f} err={r.get('rel_err')}"
    cands = [f"{c['config']['tile_n']}/{c['config']['rows_per_wg']}/m{c['config']['tile_m']}/s{c['config']['splits']}/st{c['config']['stages']}"
             f"{'/ws' if c['config']['warp_specialized'] else ''}:{c.get('us', c.get('error', '?')[:60])}" for c in r.get("candidates", [])]
    print(head, *cands, sep="\n  ")
PY
