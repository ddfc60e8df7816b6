"""Fused low-bit matmul kernels vs XLA bf16 on this GPU, over the Llama-2-7B / Mistral-7B shapes.

    # on the GPU machine (writes records, meta and the tuning table under --out):
    PYTHONPATH=. python scripts/bench_kernels.py --out $OUT
    # the Hopper W4 kernel (wgmma) as linear() runs a repacked model, every shape and batch
    # (--suite wgmma-w8w2: W8 per channel and W2 g128 on it; --suite wgmma-w3: W3 g128):
    PYTHONPATH=. python scripts/bench_kernels.py --suite wgmma --out $OUT
    # anywhere: markdown table and plot from a records file
    PYTHONPATH=. python scripts/bench_kernels.py --report docs/results/quant_matmul_h100.json

The records (`quant_matmul_<card>.json`) are a list with the keys bits, group_size, m, k, n,
kernel_us, xla_bf16_us, speedup, roofline_fraction (and more: variant, config, rel_err, ...).
`quant_matmul_tuning.json` holds the tuned configs and the measured kernel-vs-XLA rule; copy
it to `pallas_kernels/` to make it the shipped table that `linear()` dispatches by.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from jaxcompress.io.atomic import write_json, write_text


def suites(name: str):
    from pallas_kernels.benchmark import Sweep
    from pallas_kernels.testing import Variant

    from pallas_kernels.benchmark import E2E_SHAPES as E2E
    from pallas_kernels.benchmark import FUSED_SHAPES as FUSED
    from pallas_kernels.benchmark import LLAMA_SHAPES as LLAMA

    small = ((4096, 4096), (4096, 11008))
    full = [
        Sweep(Variant(4, 128)),  # the headline: W4 g128, every shape and batch
        Sweep(Variant(8, 0), batches=(1, 2, 4, 8, 16, 32), tune_batches=(1, 4, 16)),
        Sweep(Variant(3, 128), batches=(1, 4), tune_batches=(1, 4)),
        Sweep(Variant(2, 128), batches=(1, 4), tune_batches=(1, 4)),
        Sweep(Variant(4, 128, "asym"), shapes=small, batches=(1, 16), tune_batches=(1, 16)),
        Sweep(Variant(4, 32, "asym", tiled_rows=32), shapes=small, batches=(1, 16, 64), tune_batches=(1, 16, 64)),
        Sweep(Variant(3, 128, tiled_rows=32), shapes=small, batches=(1, 16), tune_batches=(1, 16)),
        Sweep(Variant(4, 0, "lut"), shapes=small, batches=(1, 16), tune_batches=(1, 16)),
        Sweep(Variant(8, 0), shapes=small, batches=(16, 64, 256), tune_batches=(16, 64, 256), kind="a8"),
        Sweep(Variant(4, 128, tiled_rows=32), shapes=small, batches=(16, 64, 256), tune_batches=(16, 64, 256),
              kind="a8"),
    ]
    if name == "full":
        return full
    if name == "lean":  # what fits a few minutes of GPU time: the headline sweep and batch 1 elsewhere
        w4 = Sweep(Variant(4, 128), batches=(1, 4, 16, 64, 256), tune_batches=(1, 16, 256))
        batch1 = [Sweep(s.variant, shapes=small, batches=(1,), tune_batches=(1,))
                  for s in full[1:4] + full[6:8]]
        a8 = [Sweep(s.variant, shapes=small[:1], batches=(16, 256), tune_batches=(16, 256), kind="a8")
              for s in full[8:10]]
        return [w4] + batch1 + [Sweep(full[5].variant, shapes=small[:1], batches=(1, 16), tune_batches=(1, 16))] + a8
    if name == "run3":  # ~3 minutes: the priorities, most important first (deadline-cut)
        w4, every = Variant(4, 128), LLAMA
        return [
            Sweep(w4, shapes=every, batches=(1,), tune_batches=(1,), max_candidates=11),
            Sweep(w4, shapes=every, batches=(2, 4, 8), tune_batches=(4,), max_candidates=6),
            Sweep(w4, shapes=every, batches=(16, 32), tune_batches=(16,), max_candidates=4),
            *[Sweep(Variant(b, g), shapes=small, batches=(1,), tune_batches=(1,), max_candidates=6)
              for b, g in ((8, 0), (3, 128), (2, 128))],
            Sweep(w4, shapes=every, batches=(64, 128, 256), tune_batches=(64, 256), max_candidates=4),
            *[dataclasses.replace(s, shapes=small[:1], max_candidates=4) for s in full[4:]],
        ]
    if name == "h2":  # the f16x2 GEMV (dequant="h2", prefetch) against "fma": every candidate at batch 1
        w4, every = Variant(4, 128), LLAMA
        return [
            Sweep(w4, shapes=every, batches=(1,), tune_batches=(1,), max_candidates=20),
            Sweep(w4, shapes=every, batches=(2, 4, 8), tune_batches=(2, 8), max_candidates=8),
            *[Sweep(v, shapes=small, batches=(1,), tune_batches=(1,), max_candidates=8)
              for v in (Variant(8, 0), Variant(2, 128), Variant(4, 128, "asym"))],
            Sweep(w4, shapes=every, batches=(16, 32), tune_batches=(16,), max_candidates=4),
        ]
    if name == "h2-e2e":  # what the end-to-end W4 decode (asymmetric RTN on Llama-2-7B) runs, then the rest
        llama2 = ((4096, 4096), (4096, 11008), (11008, 4096))
        asym = Variant(4, 128, "asym")
        return [
            Sweep(asym, shapes=llama2, batches=(1,), tune_batches=(1,), max_candidates=11),
            Sweep(Variant(4, 128), shapes=LLAMA, batches=(1,), tune_batches=(1,), max_candidates=11),
            Sweep(asym, shapes=llama2, batches=(8,), tune_batches=(8,), max_candidates=8),
            *[Sweep(v, shapes=small, batches=(1,), tune_batches=(1,), max_candidates=8)
              for v in (Variant(8, 0), Variant(2, 128))],
        ]
    if name == "fused":  # the fused q|k|v and gate|up shapes, Llama-2 asymmetric first (the e2e recipe)
        asym, llama2 = Variant(4, 128, "asym"), FUSED[:2]
        return [
            Sweep(asym, shapes=llama2, batches=(1,), tune_batches=(1,), max_candidates=11),
            Sweep(asym, shapes=llama2, batches=(8,), tune_batches=(8,), max_candidates=8),
            Sweep(Variant(4, 128), shapes=FUSED, batches=(1,), tune_batches=(1,), max_candidates=11),
            Sweep(Variant(4, 128), shapes=FUSED, batches=(2, 4, 8), tune_batches=(4,), max_candidates=6),
        ]
    if name == "run10":  # after the evict_first hint: what the end-to-end W4 decode runs (asymmetric RTN,
        # fused Llama-2-7B) at batch 1 and 8, then symmetric W4 on every shape at batch 1
        asym = Variant(4, 128, "asym")
        return [
            Sweep(asym, shapes=E2E, batches=(1,), tune_batches=(1,), max_candidates=8),
            Sweep(Variant(4, 128), shapes=LLAMA, batches=(1,), tune_batches=(1,), max_candidates=6),
            Sweep(asym, shapes=E2E, batches=(8,), tune_batches=(8,), max_candidates=6),
        ]
    if name == "e2e":  # the end-to-end model's projections (asymmetric W4, fused) at every decode batch it
        # runs, each batch tuned for itself (run 10: borrowed batch-32 configs made it 0.72x bf16, tuned 0.99x)
        return [Sweep(Variant(4, 128, "asym"), shapes=E2E, batches=(b,), tune_batches=(b,), max_candidates=6)
                for b in (1, 8, 16, 32)]
    if name == "sym-batched":  # the headline W4 g128 (symmetric) on every shape at batch 8 and 16, each
        # tuned for itself (the shipped entries there were wall-ranked or borrowed, run 10)
        return [Sweep(Variant(4, 128), shapes=LLAMA, batches=(b,), tune_batches=(b,), max_candidates=6)
                for b in (8, 16)]
    if name == "run10b":  # the other bit widths at batch 1 with the hint: W8 per channel (target 1.8x), W2
        return [Sweep(Variant(8, 0), shapes=LLAMA, batches=(1,), tune_batches=(1,), max_candidates=6),
                Sweep(Variant(2, 128), shapes=small, batches=(1,), tune_batches=(1,), max_candidates=6)]
    if name == "run3-rest":  # run3 after W4 batch 1-8 (recorded on the H100 in run 4): what it did not reach
        return suites("run3")[2:]
    if name == "quick":  # one shape per variant, few batches: a smoke run
        return [Sweep(s.variant, shapes=((4096, 4096),), batches=s.tune_batches[:2], tune_batches=s.tune_batches[:2],
                      kind=s.kind) for s in full]
    if name == "w4":
        return full[:1]
    if name == "wgmma":  # the Hopper kernel on repacked W4 g128 weights (what linear() runs for a model
        # repacked by `repack_for_wgmma`): every shape and batch, symmetric, then asymmetric
        return [Sweep(Variant(4, 128), kind="wgmma"),
                Sweep(Variant(4, 128, "asym"), shapes=LLAMA[:4], batches=(1, 8, 32, 128, 512), kind="wgmma")]
    if name == "wgmma-w8w2":  # the Hopper kernel on repacked W8 per channel and W2 g128 weights (kernel_notes
        # run 21 timed 4 shapes at batch 1 / 8 in the probe): every shape, decode batches and two prefill ones
        return [Sweep(Variant(8, 0), batches=(1, 2, 4, 8, 16, 32, 128), kind="wgmma"),
                Sweep(Variant(2, 128), batches=(1, 2, 4, 8, 16, 32, 128), kind="wgmma")]
    if name == "wgmma-w3":  # the Hopper kernel on repacked W3 g128 weights (two code planes), most important
        # batches first where a deadline cuts it: 1 and 8, the other decode batches, then two prefill ones
        w3 = Variant(3, 128)
        return [Sweep(w3, batches=(1, 8), kind="wgmma"), Sweep(w3, batches=(2, 4, 16, 32), kind="wgmma"),
                Sweep(w3, batches=(64, 256), kind="wgmma")]
    raise SystemExit(f"unknown suite {name!r}: choose full, lean, run3, run3-rest, h2, h2-e2e, fused, run10, run10b, e2e, "
                     f"sym-batched, quick, w4, wgmma, wgmma-w8w2 or wgmma-w3")


def only_batches(sweeps, batches: set[int]) -> list:
    """The sweeps restricted to `batches` (timed and tuned); sweeps left with none are dropped."""
    kept = [dataclasses.replace(s, batches=tuple(b for b in s.batches if b in batches),
                                tune_batches=tuple(b for b in s.tune_batches if b in batches)) for s in sweeps]
    return [s for s in kept if s.batches]


def card_tag(kind: str) -> str:
    k = kind.lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in k:
            return tag
    return k.replace(" ", "_")


def report(path: str) -> None:
    from pallas_kernels.benchmark import markdown, plot

    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    meta_path = path.replace(".json", "_meta.json")
    meta = json.load(open(meta_path, encoding="utf-8")) if os.path.exists(meta_path) else {}
    stem = path[: -len(".json")]
    write_text(stem + ".md", markdown(records, meta))
    note = "v1 harness: wall clock, host overhead not amortized (see kernel_notes.md)" \
        if meta.get("timing") == "wall_v1" else ""
    plot(records, stem + ".png", meta.get("card", "?"), note)
    print(f"wrote {stem}.md and {stem}.png")


def table_from_records(records: list[dict]):
    """A tuning table rebuilt from benchmark records: per point, the candidate ranked first by
    `autotune.rank_us` (CUPTI device time where recorded), so records written before the ranking
    changed (run 10c ranked by the wall clock) give the table the current rule would have kept."""
    from pallas_kernels.autotune import Entry, Problem, TuningTable, m_bucket
    from pallas_kernels.quant_matmul import TileConfig

    table = TuningTable()
    for r in records:
        if r.get("invalid") or r.get("error") or not r.get("config") or r.get("kind") == "wgmma":
            continue  # the wgmma kernel picks its own config (not a Triton tuning entry)
        problem = Problem(r["kind"], r["bits"], 0 if r["group_size"] >= r["k"] else r["group_size"], r["grid"],
                          r["layout"], r["rows"], r["k"], r["n"], m_bucket(r["m"]))
        timed = [c for c in r.get("candidates", []) if c.get("device_us") is not None]
        best = min(timed, key=lambda c: c["device_us"]) if timed else {"config": r["config"], "device_us": r["kernel_us"]}
        table.add(Entry(problem, TileConfig.from_json(best["config"]), best["device_us"], r.get("xla_dequant_us")))
    return table


def retable(records_path: str, into: str, note: str) -> int:
    """Merges the table rebuilt from `records_path` into the table at `into` (last one wins)."""
    from jaxcompress.errors import UserError
    from pallas_kernels.autotune import TuningTable

    try:
        with open(records_path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--retable {records_path}: cannot read benchmark records ({e}); pass the "
                        f"quant_matmul_<card>.json a bench_kernels.py run wrote") from e
    if not isinstance(records, list):
        raise UserError(f"--retable {records_path}: expected a list of benchmark records, got "
                        f"{type(records).__name__} (the _meta.json or _tuning.json file?)")
    new = table_from_records(records)
    table = TuningTable.load(into)
    table.merge(new)
    if note:
        table.meta["note"] = f"{table.meta.get('note', '')}; {note}".lstrip("; ")
    table.save(into)
    print(f"merged {len(new.entries)} entries from {records_path} into {into} ({len(table.entries)} in all)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the records, meta and tuning table")
    p.add_argument("--suite", default="full")
    p.add_argument("--deadline-s", type=float, default=420.0, help="stop sweeping after this long")
    p.add_argument("--max-candidates", type=int, default=4)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check of each point")
    p.add_argument("--report", help="records JSON: write its markdown table and plot, then exit")
    p.add_argument("--shapes", help="KxN,KxN,... instead of the suite's shapes")
    p.add_argument("--batches", help="B,B,...: only the suite's sweeps and batches among these (e.g. the rest "
                                     "of a suite a deadline cut)")
    p.add_argument("--interpret", action="store_true", help="dry run on a CPU in interpret mode (tiny --shapes)")
    p.add_argument("--retable", metavar="RECORDS", help="records JSON: merge the tuning table they give "
                   "(each point's fastest candidate on the device) into --into, then exit")
    p.add_argument("--into", default="pallas_kernels/quant_matmul_tuning.json")
    p.add_argument("--note", default="", help="with --retable: appended to the table's meta note")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.report:
        return report(args.report)
    if args.retable:
        return retable(args.retable, args.into, args.note)
    if not args.out:
        p.error("--out is required (or --report)")

    import jax

    from jaxcompress.provenance import provenance
    from pallas_kernels.benchmark import Runner, markdown

    dev = jax.devices()[0]
    tag = card_tag(dev.device_kind)
    runner = Runner(args.deadline_s, args.max_candidates, check=not args.no_check, interpret=args.interpret)
    meta = {"card": dev.device_kind, "copy_bandwidth_GBps": runner.bandwidth / 1e9,
            "matmul_TFLOPs": runner.flops / 1e12, "suite": args.suite, **provenance()}
    meta["commit"] = meta.get("git_commit")
    meta["jax"] = jax.__version__
    sweeps = suites(args.suite)
    if args.shapes:
        shapes = tuple(tuple(int(d) for d in s.split("x")) for s in args.shapes.split(","))
        sweeps = [dataclasses.replace(s, shapes=shapes) for s in sweeps]
    if args.batches:
        sweeps = only_batches(sweeps, {int(b) for b in args.batches.split(",")})
    def save():
        for r in runner.records:
            r["card"] = dev.device_kind
        write_json(os.path.join(args.out, f"quant_matmul_{tag}.json"), runner.records)
        write_json(os.path.join(args.out, f"quant_matmul_{tag}_meta.json"), meta)
        runner.table.meta = {"card": dev.device_kind, "jax": jax.__version__}
        runner.table.save(os.path.join(args.out, "quant_matmul_tuning.json"))

    runner.on_record = save
    for sweep in sweeps:
        runner.run(sweep)
    save()
    print(markdown(runner.records, meta))


if __name__ == "__main__":
    sys.exit(main())
