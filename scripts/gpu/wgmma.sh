# The wgmma W4 kernel on the GPU machine (kernel_notes.md run 13): its GPU tests (WGMMA_TESTS=1),
# then end-to-end decode (random Llama-2-7B, context 512, 16 steps) of the runs in WGMMA_RUNS,
# each "name:timeout_s:batches[:sym]" (WGMMA_PREFILL=1 times the prefill of WGMMA_CONTEXT tokens too) with name bf16_fused, w4_fused (Triton kernels),
# w4_fused_wgmma (repacked for this kernel, K = 11008 stored padded to 11264) or
# w4_fused_wgmma_unpad (K stored as it is); "sym" quantizes with a symmetric grid (rtn_w4_g128 is asymmetric). Logs under $OUT/$WGMMA_DIR. Carry .whl (the pytest wheels).
export JAXCOMPRESS_GIT_COMMIT=${JAXCOMPRESS_GIT_COMMIT:?set it to the commit under test} XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
D=$OUT/${WGMMA_DIR:-wgmma}; mkdir -p $D
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${WGMMA_TESTS:-0}" = 1 ]; then
  pip install -q --no-index --no-deps --target /tmp/sp .whl/{pytest,pluggy,iniconfig,pygments}-*.whl >/dev/null 2>&1
  PYTHONPATH=.:/tmp/sp timeout -k 5 150 python -m pytest -q tests/gpu/test_wgmma_matmul_gpu.py > $D/pytest.log 2>&1
  echo "pytest rc=$?"; tail -1 $D/pytest.log
fi
for run in ${WGMMA_RUNS:-w4_fused_wgmma:300:1,8,32 w4_fused:90:32}; do
  IFS=: read name cap batches grid <<< "$run"
  args="--fuse-projections"
  [ "$name" != bf16_fused ] && args="$args --recipe rtn_w4_g128"
  [ "$name" = w4_fused_wgmma ] && args="$args --wgmma"
  [ "$name" = w4_fused_wgmma_unpad ] && args="$args --wgmma --no-wgmma-pad-k"
  [ "$grid" = sym ] && args="$args --set weights.symmetric=true" && name=${name}_sym  # after the flags by name
  echo "$name start $(date +%T)"
  [ "${WGMMA_PREFILL:-0}" = 1 ] || args="$args --skip-prefill"
  PYTHONPATH=. timeout -k 5 $cap python scripts/bench_decode.py --model random:llama2-7b --batches $batches \
    --context ${WGMMA_CONTEXT:-512} --steps 16 $args --out $D/decode_$name.json > $D/decode_$name.log 2>&1
  echo "$name rc=$? $(date +%T)"; grep "decode batch\|repacked\|prefill" $D/decode_$name.log
done
