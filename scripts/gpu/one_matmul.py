"""A few calls of one 4-bit matmul through `linear()`, for a hardware-counter profiler.

    ncu --clock-control none --kernel-name regex:'mosaic|quant_matmul' --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis \\
        python scripts/gpu/one_matmul.py --kernel wgmma --shape 4096x14336 --batch 1

`--kernel wgmma` repacks the weight for the Hopper wgmma kernel (`W4Weight`, the model's blocked
layout); `triton` keeps the QArray, which `linear()` sends to the Triton kernels with the shipped
tuning table. The first call compiles; the others run the same program on the same operands, so
`--launch-skip 1` profiles a warm call. Prints the output's relative error against float64.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from jaxcompress.ops.linear import linear  # noqa: E402
from pallas_kernels import wgmma_matmul as wm  # noqa: E402
from pallas_kernels.testing import Variant, float64_reference, random_activations, random_weight, relative_error  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=("wgmma", "triton"), required=True)
    p.add_argument("--shape", default="4096x14336", help="KxN")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grid", choices=("sym", "asym"), default="sym")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shape.split("x"))
    q = random_weight(0, k, n, Variant(4, args.group_size, args.grid))
    w = wm.repack_w4(q, block_k=wm.choose_block_k(k, n)) if args.kernel == "wgmma" else q
    x = random_activations(1, (args.batch, k))
    fn = jax.jit(linear)
    for _ in range(args.calls):
        y = fn(x, w).block_until_ready()
    print(f"{args.kernel} {k}x{n} batch {args.batch} {args.grid} g{args.group_size}: "
          f"relative error {relative_error(y, float64_reference(x, q)):.2e} after {args.calls} calls")


if __name__ == "__main__":
    main()
