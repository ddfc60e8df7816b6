# Hardware counters (ncu) of the kernels that hold issues 5 and 6 back, warm calls, each in its own
# process: the cw2 keys and values passes of KIVI-2 at 32k (batch NCU_KV_BATCH, default 8), the
# wgmma W4 kernel at 256 rows on 14336 x 4096 (gemm_config's tiles) and at 8 rows on 4096 x 14336
# (decode tiles). Sections: speed of light, warp states with every stall reason a issued instruction,
# scheduler, occupancy, memory and compute workload. Logs under $OUT/${NCU_DIR:-ncu}.
set -u
D=$OUT/${NCU_DIR:-ncu}; mkdir -p "$D"
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda PYTHONPATH=. PYTHONUNBUFFERED=1
command -v ncu >/dev/null || { echo "ncu not found"; exit 1; }
S="--clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
   --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats
   --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
timeout -k 5 ${NCU_KV_S:-150} ncu $S --kernel-name regex:'scores|values' --launch-skip 2 --launch-count 2 \
  python scripts/profile_kv_decode.py --batch ${NCU_KV_BATCH:-8} > "$D/ncu_kv.txt" 2>&1; echo "kv rc=$?"
timeout -k 5 ${NCU_MM_S:-100} ncu $S --kernel-name regex:'mosaic' --launch-skip 1 --launch-count 1 \
  python scripts/gpu/one_matmul.py --kernel wgmma --shape 14336x4096 --batch 256 > "$D/ncu_gemm256.txt" 2>&1; echo "gemm rc=$?"
timeout -k 5 ${NCU_MM_S:-100} ncu $S --kernel-name regex:'mosaic' --launch-skip 1 --launch-count 1 \
  python scripts/gpu/one_matmul.py --kernel wgmma --shape 4096x14336 --batch 8 > "$D/ncu_decode8.txt" 2>&1; echo "decode rc=$?"
for f in "$D"/ncu_*.txt; do
  echo "== $f"; grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Issued Ipc|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|stalled_(long_scoreboard|short_scoreboard|wait|barrier|math_pipe_throttle|mio_throttle|lg_throttle|not_selected|selected|no_instruction|dispatch_stall|membar|sleeping)_per" "$f" | head -60
done
