"""Do cache hints on the W4 GEMV's loads pay? (issue 5, kernel_notes run 10)

Run 10a (this script's first version) timed the codes as stored, stored column-blocked (each
program's words one contiguous run) and loaded with `evict_first`: blocking changed nothing,
the hint gained 3-12%. `LoadHints()` now hints the codes by default. This version times, for
each shape (W4 g128 asymmetric at batch 1: the end-to-end model's projections, fused as served)
and candidate config (CUPTI device time a call, split-K pass included), the hint sets in
`HINTS`, plus the loads-only probe of the best default config and XLA's bf16 GEMV on the same
shape. Each result is checked against the reference before it is timed. Writes
`$OUT/layout_experiment.json` after every shape and prints a table last.

    PYTHONPATH=. JAX_PLATFORMS=cuda python scripts/gpu/layout_experiment.py --out $OUT --deadline-s 240
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time

import jax
import jax.numpy as jnp

from jaxcompress.io.atomic import write_json
from pallas_kernels import autotune
from pallas_kernels.benchmark import bf16_timing
from pallas_kernels.layout import kernel_layout
from pallas_kernels.quant_matmul import NO_HINTS, LoadHints, TileConfig, probe_matmul, quant_matmul, quant_matmul_reference
from pallas_kernels.testing import Variant, random_weight, relative_error

log = logging.getLogger("layout_experiment")
SHAPES = ((4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096))
VARIANT = Variant(4, 128, "asym")
HINTS = {"none": NO_HINTS, "codes": LoadHints(), "codes+groups": LoadHints(groups="evict_first"),
         "codes+groups,x_last": LoadHints(groups="evict_first", x="evict_last")}


def extra_configs(lay, sms: int) -> list[TileConfig]:
    """Beyond the autotuner's list: more bytes in flight a program (4 tiles a step, prefetched)."""
    base = TileConfig(block_n=64, block_m=1, dequant="h2", acc2d=True, prefetch=True, num_warps=4)
    out = []
    for bn, warps, step in ((64, 4, 4), (128, 8, 2), (32, 2, 4)):
        programs = lay.n // bn
        split = 1
        while programs * split < 2 * sms and lay.num_tiles % (2 * split * step) == 0 and split < 16:
            split *= 2
        out.append(dataclasses.replace(base, block_n=bn, num_warps=warps, tiles_per_step=step, split_k=split))
    return out


def run_shape(k: int, n: int, max_candidates: int, interpret: bool = False) -> dict:
    w = random_weight(k * 7 + n, k, n, VARIANT)
    lay = kernel_layout(w)
    sms = autotune.num_sms()
    cands = autotune.candidates(lay, 1, sms=sms)[:max_candidates]
    cands += [c for c in extra_configs(lay, sms)
              if c not in cands and autotune.config_problem(c, lay, 1) is None]
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32).astype(jnp.bfloat16)
    ref = quant_matmul_reference(x, w)
    xs, ws = autotune.random_inputs(w, 1, jnp.bfloat16, seed=1)
    rows = []
    for hint, hints in HINTS.items():
        for cfg in cands:
            f = functools.partial(lambda x, ww, c, h: quant_matmul(x, ww, config=c, interpret=interpret, hints=h),
                                  c=cfg, h=hints)
            rec = {"layout": hint, "config": cfg.to_json()}  # "layout": the key of run 10a's records
            try:
                rec["rel_err"] = relative_error(jax.jit(f)(x, w), ref)
                t = autotune.time_per_call(f, xs, ws)
                rec.update(device_us=t.device_us, wall_us=t.wall_us)
            except Exception as e:  # reported, never hidden
                rec.setdefault("rel_err", None)
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(rec)
            log.info("%dx%d %-20s %s -> %s", k, n, hint, cfg, rec.get("device_us", rec.get("error")))
    timed = [r for r in rows if r.get("device_us") is not None]
    best = {h: min((r for r in timed if r["layout"] == h), key=lambda r: r["device_us"], default=None)
            for h in HINTS}
    probes = {}
    if best["codes"] is not None:
        cfg = TileConfig.from_json(best["codes"]["config"])
        t = autotune.time_per_call(lambda x, ww: probe_matmul(x, ww, cfg, interpret=interpret), xs, ws)
        probes["codes"] = t.best_estimate_us
    base = bf16_timing(k, n, 1)
    return {"k": k, "n": n, "variant": VARIANT.name, "m": 1, "xla_bf16_us": base.best_estimate_us,
            "weight_bytes": sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w)),
            "best": {lo: (b and {"device_us": b["device_us"], "config": b["config"]}) for lo, b in best.items()},
            "probe_us": probes, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline-s", type=float, default=240)
    ap.add_argument("--max-candidates", type=int, default=6)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--interpret", action="store_true", help="a dry run on the CPU (use tiny --shapes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.monotonic()
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    results = []
    for spec in args.shapes.split(","):
        if time.monotonic() - t0 > args.deadline_s:
            log.warning("deadline: %s not run", spec)
            continue
        k, n = map(int, spec.split("x"))
        results.append(run_shape(k, n, args.max_candidates, args.interpret))
        write_json(f"{args.out}/layout_experiment.json", {"meta": meta, "shapes": results})
    print(f"{'K x N':>12} {'xla bf16':>9} " + " ".join(f"{h:>20}" for h in HINTS) + f" {'probe':>7}  TB/s")
    for r in results:
        b = {lo: (v["device_us"] if v else float("nan")) for lo, v in r["best"].items()}
        print(f"{r['k']:>5} x {r['n']:<5} {r['xla_bf16_us']:9.2f} " + " ".join(f"{b[h]:20.2f}" for h in HINTS)
              + f" {r['probe_us'].get('codes', float('nan')):7.2f}  {r['weight_bytes'] / min(b.values()) / 1e6:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
