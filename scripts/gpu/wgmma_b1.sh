# Batch 1 of the wgmma W4 kernel, diagnosed (kernel_notes.md run 15): does the loads-only rate
# depend on how the programs divide over the 132 SMs (N = 14336: 224 tiles; 16896: 2 x 132;
# 8448: 132), and where do the warps of the kernel and of the Triton GEMV stall (ncu)?
# Logs under $OUT/${B1_DIR:-b1}. Set JAXCOMPRESS_GIT_COMMIT.
export JAXCOMPRESS_GIT_COMMIT=${JAXCOMPRESS_GIT_COMMIT:?set it to the commit under test} XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
D=$OUT/${B1_DIR:-b1}; mkdir -p $D
nvidia-smi --query-gpu=name --format=csv,noheader
CONFIGS=${B1_CONFIGS:-64:256:1:4+loads+blocked,64:256:2:4+loads+blocked,64:256:4:4+loads+blocked,64:256:1:4+blocked,64:256:2:4+blocked}
PYTHONPATH=. timeout -k 5 ${B1_PROBE_S:-240} python scripts/gpu/wgmma_w4_probe.py --out $D/wave.json \
  --shapes ${B1_SHAPES:-4096x14336,4096x16896,4096x8448} --batches ${B1_BATCHES:-1} --configs $CONFIGS > $D/wave.log 2>&1
echo "probe rc=$?"
if [ "${B1_NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  for kernel in wgmma triton; do
    PYTHONPATH=. timeout -k 5 ${B1_NCU_S:-90} ncu --clock-control none --kernel-name regex:'mosaic|quant_matmul' \
      --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      python scripts/gpu/one_matmul.py --kernel $kernel --shape 4096x14336 --batch 1 > $D/ncu_$kernel.txt 2>&1
    echo "ncu $kernel rc=$?"
  done
fi
python - "$D/wave.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{'K x N':12} {'m':>3} {'cfg':28} {'us':>6} {'kernel':>6} {'TB/s':>5}  (bf16 us)")
for r in d["records"]:
    for c in r.get("candidates", []):
        cfg = c["config"]
        name = (f"{cfg['tile_n']}:{cfg['tile_k']}:{cfg['splits']}:{cfg['stages']}{'+loads' if cfg['loads_only'] else ''}"
                f"{'+' + cfg['split_sum'] if cfg.get('split_sum') else ''}{'+pad' if cfg.get('stored_k') else ''}")
        if "us" not in c:
            print(f"{r['k']}x{r['n']:<7} {name:28} ERROR {c.get('error', '')[:80]}")
            continue
        kern = sum(v for k, v in c["kernels"].items() if "mosaic" in k)
        print(f"{r['k']}x{r['n']:<7} {r['m']:>3} {name:28} {c['us']:6.2f} {kern:6.2f} {r['weight_bytes'] / kern / 1e6:5.2f}  "
              f"({r['xla_bf16_us']:.1f}) err {c.get('rel_err') or 0:.1e}")
EOF
