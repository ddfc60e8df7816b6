"""Each `W4Config` of the wgmma W4 kernel compiled and run in a child process of its own, under a
timeout: a config that hangs on the GPU (a deadlocked barrier, say) is reported and the next one
still runs. Prints compile seconds, run seconds and the error against float64 per config.

    python scripts/gpu/wgmma_smoke.py --shape 4096x4096 --batch 1 --configs 64:256:1:4,64:256:2:4+xla

Config syntax as `wgmma_w4_probe.py --configs`. With MOSAIC_GPU_DUMP_PTX=1 set, Mosaic GPU prints
each kernel's PTX to the child's stdout (the log of a hung config shows how far it got).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(shape: str, batch: int, config: str, grid: str) -> None:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "scripts", "gpu"))
    import jax

    from pallas_kernels import wgmma_matmul as wm
    from pallas_kernels.testing import Variant, float64_reference, random_activations, random_weight, relative_error
    from wgmma_w4_probe import parse_configs, resolve_default

    k, n = (int(v) for v in shape.split("x"))
    [cand] = parse_configs(config)
    cfg, order, block_k, pad = resolve_default(cand, k, n, batch, grid)
    q = random_weight(0, k, n, Variant(4, 128, grid))
    w = wm.repack_w4(q, order=order, block_k=block_k, stored_k=wm.padded_k(k, n) if pad else 0)
    x = random_activations(1, (batch, k))
    t0 = time.time()
    compiled = jax.jit(lambda x_, w_: wm.w4_matmul(x_, w_, cfg)).lower(x, w).compile()
    t1 = time.time()
    print(f"compiled in {t1 - t0:.1f} s", flush=True)
    y = compiled(x, w).block_until_ready()
    t2 = time.time()
    print(f"RESULT compile {t1 - t0:.1f} s run {t2 - t1:.2f} s rel_err {relative_error(y, float64_reference(x, q)):.2e}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grid", choices=("sym", "asym"), default="asym")
    ap.add_argument("--configs", default="")
    ap.add_argument("--timeout-s", type=float, default=45)
    ap.add_argument("--log-dir", default=None, help="write each child's output to <dir>/<n>.log")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.shape, args.batch, args.child, args.grid)
    for i, config in enumerate(filter(None, args.configs.split(","))):
        cmd = [sys.executable, __file__, "--shape", args.shape, "--batch", str(args.batch), "--grid", args.grid,
               "--child", config]
        t0 = time.time()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            text, status = out.stdout + out.stderr, f"rc={out.returncode}"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() + (e.stderr or b"").decode() if isinstance(e.stdout, bytes) else \
                (e.stdout or "") + (e.stderr or "")
            status = f"TIMEOUT after {args.timeout_s:.0f} s"
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            with open(os.path.join(args.log_dir, f"{i}.log"), "w") as f:
                f.write(f"{config}\n{text}")
        result = [line for line in text.splitlines() if line.startswith(("RESULT", "compiled"))]
        errors = [line for line in text.splitlines() if "Error" in line][-1:]
        print(f"{args.shape} b{args.batch} {config:24} {status:18} {time.time() - t0:5.1f} s  "
              f"{(result or errors or [''])[-1][:300]}", flush=True)


if __name__ == "__main__":
    main()
