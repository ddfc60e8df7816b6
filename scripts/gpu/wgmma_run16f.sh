export JAXCOMPRESS_GIT_COMMIT=06b34b9 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
D=$OUT/f; mkdir -p $D
pip install -q --no-index --no-deps --target /tmp/sp .whl/{pytest,pluggy,iniconfig,pygments}-*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=.:/tmp/sp timeout -k 5 150 python -m pytest -q tests/gpu/test_wgmma_matmul_gpu.py > $D/pytest.log 2>&1; echo "pytest rc=$?"; tail -3 $D/pytest.log
for run in bf16_fused:--fuse-projections w4_fused:"--recipe rtn_w4_g128 --fuse-projections" w4_fused_wgmma:"--recipe rtn_w4_g128 --fuse-projections --wgmma"; do
  name=${run%%:*}; args=${run#*:}
  PYTHONPATH=. timeout -k 5 115 python scripts/bench_decode.py --model random:llama2-7b --batches 1,8,32 --context 512 --steps 16 --skip-prefill $args --out $D/decode_$name.json > $D/decode_$name.log 2>&1; echo "$name rc=$?"
  grep "decode batch\|repacked\|fused" $D/decode_$name.log
done
