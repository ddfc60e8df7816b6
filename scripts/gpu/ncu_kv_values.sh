# Hardware counters (ncu) of the wgmma values pass (`Cw2Config(values="wgmma")`, kv_values_wgmma; options
# NCU_KV_CW2 as bench_kv.py reads them): KIVI-2 at 32k, Llama-2-7B heads, batch NCU_KV_BATCH (default 8),
# one warm call.
# Sections: speed of light, warp states with every stall reason, scheduler, occupancy, launch.
# Log: $OUT/${NCU_DIR:-ncu}/ncu_kv_values.txt, and its headline lines on stdout.
set -u
D=$OUT/${NCU_DIR:-ncu}; mkdir -p "$D"
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda PYTHONPATH=. PYTHONUNBUFFERED=1
command -v ncu >/dev/null || { echo "ncu not found"; exit 1; }
S="--clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
   --section LaunchStats --section MemoryWorkloadAnalysis
   --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
timeout -k 5 ${NCU_KV_S:-150} ncu $S --kernel-name regex:'mosaic' --launch-skip 1 --launch-count 1 \
  python scripts/profile_kv_decode.py --batch ${NCU_KV_BATCH:-8} --path cw2 --cw2 ${NCU_KV_CW2:-vwg} \
  > "$D/ncu_kv_values.txt" 2>&1; echo "kv values rc=$?"
grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Issued Ipc|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Block Limit|Registers Per|Shared Memory Config|Dynamic Shared|Grid Size|Waves|stalled_[a-z_]+_per_issue_active.ratio +[a-z]* +[0-9.]+" "$D/ncu_kv_values.txt" | head -60
