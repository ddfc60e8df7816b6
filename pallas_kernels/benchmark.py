"""Benchmark of the fused kernels against XLA's bf16 matmul on the same card, in the same run.

For each (variant, K, N, batch M) it records the kernel time (best of the tuned candidates),
the XLA bf16 `dot` time on a dense weight of the same shape, the XLA dequantize-then-dot time
(what `linear()` would do without the kernel), the speedup over bf16, the achieved bandwidth
and the fraction of the roofline: floor / time with floor = max(bytes / copy bandwidth,
flops / bf16 matmul rate), both ceilings measured in the same run. Before a point is timed,
the kernel's output on a real random QArray is checked against the reference.

`scripts/bench_kernels.py` is the command line; `write_report` turns the JSON into the
markdown table and the speedup plot.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp

from jaxcompress.bench.timing import copy_bandwidth, median_seconds
from jaxcompress.ops.linear import dense_linear
from pallas_kernels import autotune
from pallas_kernels.int8_matmul import int8_layout, int8_matmul, int8_matmul_reference
from pallas_kernels.layout import kernel_layout
from pallas_kernels.quant_matmul import NO_HINTS, TileConfig, probe_matmul, quant_matmul, quant_matmul_reference
from pallas_kernels.testing import Variant, random_weight, relative_error

log = logging.getLogger(__name__)

LLAMA_SHAPES = ((4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
# The same projections fused as served (jaxcompress.models.fuse): q|k|v and gate|up of
# Llama-2-7B (MHA: 3 x 4096; 2 x 11008), then Mistral-7B (GQA: 4096 + 2 x 1024; 2 x 14336).
FUSED_SHAPES = ((4096, 12288), (4096, 22016), (4096, 6144), (4096, 28672))
# What a decode step of the end-to-end model (Llama-2-7B, fused) multiplies: q|k|v, gate|up, down, o.
E2E_SHAPES = FUSED_SHAPES[:2] + ((11008, 4096), (4096, 4096))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One variant over shapes and batches; configs are tuned at `tune_batches` and reused by
    the nearest tuned batch elsewhere."""

    variant: Variant
    shapes: tuple = LLAMA_SHAPES
    batches: tuple = BATCHES
    tune_batches: tuple = (1, 4, 16, 64, 256)
    kind: str = "a16"  # "a8": int8 activations; "wgmma": the Hopper W4 kernel on repacked weights
    max_candidates: int | None = None  # None: the runner's cap


def matmul_peak_flops(n: int = 8192) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n**3 / median_seconds(f, a, b, warmup=2, repeats=10)


def _nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


@functools.cache
def bf16_timing(k: int, n: int, m: int) -> autotune.Timing:
    """XLA bf16 dot (as `linear` does for a dense weight), per call, with CUPTI's per-kernel split
    and launch count (fewer launches than calls would mean XLA merged calls)."""
    xs, ws = autotune.random_inputs((k, n), m, jnp.bfloat16, seed=11, nbytes=2 * k * n)
    t = autotune.time_per_call(dense_linear, xs, ws, breakdown=True)
    if (t.kernels or {}).get(autotune.LAUNCHES_KEY, 1.0) < 0.99:
        # XLA still merged calls that share a weight buffer: give every call its own weight
        # (96 x 117 MB at most: fits an H100) and say so in the log.
        log.warning("bf16 %dx%d M=%d: %.2f launches a call; retiming with one weight buffer per call",
                    k, n, m, t.kernels[autotune.LAUNCHES_KEY])
        del xs, ws
        xs, ws = autotune.random_inputs((k, n), m, jnp.bfloat16, seed=12, n_buf=autotune.MIN_CALLS)
        t = autotune.time_per_call(dense_linear, xs, ws, breakdown=True)
    return t


def read_timing(nbytes: int, cols: int = 4096) -> autotune.Timing:
    """XLA reading about `nbytes` once a call (the fp32 sum of a bf16 array, weights cycled past the
    L2 like a kernel's): what one XLA kernel achieves on that many bytes. A kernel that must read them
    beats bf16_time / this only by reading faster than XLA's own reduction does."""
    shape = (max(nbytes // (2 * cols), 1), cols)
    xs, ws = autotune.random_inputs(shape, 1, jnp.bfloat16, seed=13, nbytes=2 * shape[0] * cols)
    return autotune.time_per_call(lambda x, w: jnp.sum(w, dtype=jnp.float32) + x[0, 0], xs, ws)


# A time that moves the bytes faster than the memory can is not a measurement of the work: it
# means XLA merged, hoisted or skipped calls (run 2's baseline). Such a number is flagged invalid
# and not reported. The bound is the card's specified HBM bandwidth where known; a read-only
# stream beats the measured read + write copy by up to ~1.25x on an H100 (run 9: 2.87 TB/s
# against a 2.39 TB/s copy), so elsewhere FLOOR_SLACK x (bytes / copy bandwidth) stands in.
FLOOR_SLACK = 0.85
SPEC_BANDWIDTH = {  # bytes/s by device-kind substring, most specific first
    "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
}


def spec_bandwidth(device_kind: str) -> float | None:
    return next((bw for name, bw in SPEC_BANDWIDTH.items() if name in device_kind), None)


def below_floor(us: float | None, floor_us: float, spec_floor_us: float | None = None) -> bool:
    """`floor_us` = bytes / copy bandwidth; `spec_floor_us` = bytes / the card's specified peak."""
    if us is None:
        return False
    return us < spec_floor_us if spec_floor_us is not None else us < FLOOR_SLACK * floor_us


class Runner:
    """Holds the ceilings, the deadline and the results of one benchmark run."""

    def __init__(self, deadline_s: float, max_candidates: int = 4, check: bool = True,
                 interpret: bool = False):
        self.deadline = time.monotonic() + deadline_s
        self.max_candidates = max_candidates
        self.check = check
        self.interpret = interpret  # a dry run of the harness on a CPU (tiny shapes only)
        self.records: list[dict] = []
        self.logged_failure = False
        self.table = autotune.TuningTable()
        self.tuned: dict[tuple, dict[int, TileConfig]] = {}  # (variant, kind, K, N) -> {batch: config}
        self.on_record = None  # called after every recorded point (the script saves the files)
        self.cap: int | None = None  # the current sweep's candidate cap
        self.bandwidth = copy_bandwidth(64 << 20 if interpret else 2 << 30)
        self.spec_bandwidth = None if interpret else spec_bandwidth(jax.devices()[0].device_kind)
        self.flops = matmul_peak_flops(256 if interpret else 8192)
        log.info("copy bandwidth %.0f GB/s, bf16 matmul %.0f TFLOP/s", self.bandwidth / 1e9, self.flops / 1e12)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def _matmul(self, kind):
        fn = int8_matmul if kind == "a8" else quant_matmul
        return functools.partial(fn, interpret=self.interpret)

    def _time(self, w, m, cfg, kind, xs, ws) -> autotune.Timing:
        matmul = self._matmul(kind)
        return autotune.time_per_call(lambda x, ww: matmul(x, ww, config=cfg), xs, ws)

    def tune(self, w, m, kind) -> tuple[TileConfig | None, float | None, list]:
        lay = int8_layout(w) if kind == "a8" else kernel_layout(w)
        cands = autotune.candidates(lay, m, sms=autotune.num_sms(), int8=kind == "a8")
        cands = cands[: self.cap or self.max_candidates]
        xs, ws = autotune.random_inputs(w, m, jnp.bfloat16, seed=m)
        matmul = self._matmul(kind)
        fns = [functools.partial(lambda x, ww, c: matmul(x, ww, config=c), c=cfg) for cfg in cands]
        tried = []
        for cfg, res in zip(cands, autotune.time_candidates(fns, xs, ws)):
            if isinstance(res, Exception):  # reported in the results, never hidden
                msg = str(res).splitlines()[0][:300] if str(res) else type(res).__name__
                if not self.logged_failure:  # the whole traceback once, for the notes
                    log.error("config %s failed", cfg, exc_info=res)
                    self.logged_failure = True
                log.warning("config %s failed: %s", cfg, msg)
                tried.append((None, cfg, msg))
            else:  # ranked by autotune.rank_us (the kernels' device time where CUPTI runs)
                tried.append((autotune.rank_us(res), cfg, res.device_us, res.wall_us))
        ok = [t for t in tried if t[0] is not None]
        if not ok:
            return None, None, tried
        us, cfg = min(ok, key=lambda t: t[0])[:2]
        return cfg, us, tried

    def point(self, sweep: Sweep, k: int, n: int, m: int, cfg_hint: TileConfig | None) -> TileConfig | None:
        """Tunes (or reuses `cfg_hint`), checks, times and records one (shape, batch) point."""
        v, kind = sweep.variant, sweep.kind
        w = random_weight(k * 7 + n, k, n, v)
        lay = int8_layout(w) if kind == "a8" else kernel_layout(w)
        rec = {"variant": v.name, "kind": kind, "bits": v.bits, "group_size": v.group_size or k,
               "grid": v.grid, "layout": "tiled" if v.tiled_rows else "native", "rows": lay.rows,
               "m": m, "k": k, "n": n}
        tuned = m in sweep.tune_batches or cfg_hint is None
        cfg = cfg_hint
        if cfg is not None and not tuned and not cfg.use_dot:
            cfg = dataclasses.replace(cfg, block_m=min(m, 8))
        if cfg is not None and autotune.config_problem(cfg, lay, m, min_dot_k=32 if kind == "a8" else 16,
                                                       even_split=kind == "a8"):
            tuned, cfg = True, None
        if tuned:
            cfg, kernel_us, tried = self.tune(w, m, kind)
            rec["candidates"] = [{"config": t[1].to_json(),
                                  **({"wall_us": t[3], "device_us": t[2]} if t[0] is not None else {"error": t[2]})}
                                 for t in tried]
        rec["tuned"] = tuned
        if cfg is None:
            rec["error"] = "no candidate config ran"
            self.records.append(rec)
            return None
        rec["config"] = cfg.to_json()
        matmul = self._matmul(kind)
        if self.check:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            y = jax.jit(lambda x, w: matmul(x, w, config=cfg))(x, w)
            ref = (int8_matmul_reference if kind == "a8" else quant_matmul_reference)(x, w)
            rec["rel_err"] = relative_error(y, ref)
        xs, ws = autotune.random_inputs(w, m, jnp.bfloat16, seed=1000 + m)
        detail = m == 1 and kind == "a16"  # per-kernel CUPTI split and the load-only probe
        matmul_fn = self._matmul(kind)
        kern = autotune.time_per_call(lambda x, ww: matmul_fn(x, ww, config=cfg), xs, ws, breakdown=detail)
        base = bf16_timing(k, n, m)  # cached per shape and batch
        _put_times(rec, kern, base)
        if detail:
            rec["kernel_breakdown_us"], rec["xla_bf16_breakdown_us"] = kern.kernels, base.kernels
            if not cfg.use_dot and not self.interpret:
                try:
                    probe = autotune.time_per_call(
                        lambda x, ww: probe_matmul(x, ww, cfg), xs, ws)
                    rec["probe_us"] = probe.best_estimate_us  # same grid and loads, no dequantization
                    # The same kernel without the codes' evict_first hint (kernel_notes run 10).
                    plain = autotune.time_per_call(
                        lambda x, ww: quant_matmul(x, ww, config=cfg, hints=NO_HINTS), xs, ws)
                    rec["kernel_unhinted_us"] = plain.best_estimate_us
                except Exception as e:  # a diagnostic only: say why, keep the point
                    rec["probe_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if m >= 16:  # the dispatch's alternative; at small batch it never wins
            deq = autotune.time_per_call(lambda x, ww: dense_linear(x, ww.dequantize()), xs, ws)
            rec["xla_dequant_wall_us"] = deq.wall_us
            if deq.device_us is not None:
                rec["xla_dequant_us"] = deq.device_us
        if not self._finish(rec, _nbytes(w), base):
            return cfg
        # The dispatch compares the same kind of time as the ranking (autotune.rank_us).
        xla = rec.get("xla_dequant_us" if rec["timing"] == "cupti" else "xla_dequant_wall_us")
        entry = autotune.Entry(autotune.problem_of(w, m, kind, lay), cfg, rec["kernel_us"], xla)
        self.table.add(entry)
        return cfg

    def wgmma_point(self, sweep: Sweep, k: int, n: int, m: int) -> None:
        """The Hopper W4 kernel as `linear()` runs a repacked model's weight: the layout of
        `repack_for_wgmma` (`stored_layout`) and the config `w4_matmul` picks for the batch itself
        (`default_config`: nothing tuned here). Checked against the QArray's reference, then timed."""
        from pallas_kernels import wgmma_matmul as wm

        v = sweep.variant
        q = random_weight(k * 7 + n, k, n, v)
        block_k, stored_k = wm.stored_layout(k, n, grouped=q.scale.shape[0] > 1)
        w = wm.repack_w4(q, block_k=block_k, stored_k=stored_k)
        cfg = wm.default_config(w, m)
        rec = {"variant": f"{v.name}-wgmma", "kind": "wgmma", "bits": v.bits, "group_size": v.group_size or k,
               "grid": v.grid, "layout": f"wgmma-bk{block_k}", "m": m, "k": k, "n": n, "tuned": False,
               "config": {**dataclasses.asdict(cfg), "lop3": wm.lop3_of(cfg, w), "block_k": block_k, "stored_k": stored_k}}
        if self.check:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            rec["rel_err"] = relative_error(wm.w4_matmul(x, w), quant_matmul_reference(x, q))
        xs, ws = autotune.random_inputs(w, m, jnp.bfloat16, seed=1000 + m, nbytes=w.nbytes())
        kern = autotune.time_per_call(wm.w4_matmul, xs, ws, breakdown=m == 1)
        base = bf16_timing(k, n, m)
        _put_times(rec, kern, base)
        if m == 1:
            rec["kernel_breakdown_us"], rec["xla_bf16_breakdown_us"] = kern.kernels, base.kernels
        self._finish(rec, w.nbytes(), base)

    def _finish(self, rec: dict, wbytes: int, base: autotune.Timing) -> bool:
        """Floors, cross-checks, speedup and roofline of a timed point; records it. False if its
        timing is invalid (flagged in the record, never reported as a result)."""
        k, n, m = rec["k"], rec["n"], rec["m"]
        moved = wbytes + 2 * m * (k + n)
        floor = max(moved / self.bandwidth, 2 * m * k * n / self.flops)
        bf16_floor = max((2 * k * n + 2 * m * (k + n)) / self.bandwidth, 2 * m * k * n / self.flops)
        rec["weight_bytes"] = wbytes
        rec["floor_us"], rec["bf16_floor_us"] = floor * 1e6, bf16_floor * 1e6
        # Cross-checks: each time against its bytes / bandwidth floor, CUPTI against the wall clock
        # (the kernels' own time cannot exceed the wall clock of the same calls).
        invalid = []
        bf16_bytes = 2 * k * n + 2 * m * (k + n)
        for key, fl, nbytes in (("kernel", floor * 1e6, moved), ("xla_bf16", bf16_floor * 1e6, bf16_bytes)):
            us, wall = rec[f"{key}_us"], rec[f"{key}_wall_us"]
            spec = None if self.spec_bandwidth is None else nbytes / self.spec_bandwidth * 1e6
            if below_floor(us, fl, spec) or below_floor(wall, fl, spec):
                bound = (f"the bytes / specified bandwidth time {spec:.2f} us" if spec is not None else
                         f"{FLOOR_SLACK} x the bytes/bandwidth floor {fl:.2f} us")
                invalid.append(f"{key}: {us:.2f} us (wall {wall:.2f}) is below {bound}")
            elif rec["timing"] == "cupti" and us > 1.15 * wall:
                invalid.append(f"{key}: CUPTI {us:.2f} us exceeds the wall clock {wall:.2f} us")
        launches = (base.kernels or {}).get(autotune.LAUNCHES_KEY)
        rec["xla_bf16_launches_per_call"] = launches
        if launches is not None and launches < 0.99:
            invalid.append(f"xla_bf16: {launches:.2f} kernel launches per call (< 1): XLA merged calls")
        if invalid:  # flagged, never reported as a result
            rec["invalid"] = invalid
            rec["kernel_us_invalid"], rec["xla_bf16_us_invalid"] = rec.pop("kernel_us"), rec.pop("xla_bf16_us")
            rec["kernel_us"] = rec["xla_bf16_us"] = rec["speedup"] = rec["roofline_fraction"] = None
            self.records.append(rec)
            log.warning("%s K=%d N=%d M=%d: INVALID timing: %s", rec["variant"], k, n, m, "; ".join(invalid))
            return False
        rec["speedup"] = rec["xla_bf16_us"] / rec["kernel_us"]
        rec["speedup_wall"] = rec["xla_bf16_wall_us"] / rec["kernel_wall_us"]
        rec["bandwidth_GBps"] = moved / rec["kernel_us"] / 1e3
        rec["roofline_fraction"] = floor * 1e6 / rec["kernel_us"]
        rec["bf16_roofline_fraction"] = bf16_floor * 1e6 / rec["xla_bf16_us"]
        self.records.append(rec)
        log.info("%s K=%d N=%d M=%d: %.1f us vs bf16 %.1f us (%.2fx, %.0f%% roofline) err %.1e",
                 rec["variant"], k, n, m, rec["kernel_us"], rec["xla_bf16_us"], rec["speedup"],
                 100 * rec["roofline_fraction"], rec.get("rel_err", float("nan")))
        return True

    def run(self, sweep: Sweep) -> None:
        self.cap = sweep.max_candidates
        for k, n in sweep.shapes:
            # Configs tuned by earlier sweeps of the same variant and shape serve as hints too.
            tuned = self.tuned.setdefault((sweep.variant, sweep.kind, k, n), {})
            for m in sorted(sweep.batches):
                if self.out_of_time():
                    log.warning("deadline reached: skipping the rest of %s", sweep.variant.name)
                    return
                near = min(tuned, key=lambda t: abs(t - m), default=None) if tuned else None
                hint = None if m in sweep.tune_batches else tuned.get(near)
                try:
                    if sweep.kind == "wgmma":
                        self.wgmma_point(sweep, k, n, m)
                        cfg = None  # not tuned: the kernel picks its config per batch
                    else:
                        cfg = self.point(sweep, k, n, m, hint)
                except Exception as e:  # keep the other points; the record says what broke
                    log.exception("point %s K=%d N=%d M=%d failed", sweep.variant.name, k, n, m)
                    first_line = str(e).splitlines()[0][:300] if str(e) else ""
                    self.records.append({"variant": sweep.variant.name, "kind": sweep.kind,
                                         "bits": sweep.variant.bits, "m": m, "k": k, "n": n,
                                         "error": f"{type(e).__name__}: {first_line}"})
                    continue
                if cfg is not None and m in sweep.tune_batches:
                    tuned[m] = cfg
                if self.on_record is not None:  # a hard timeout later loses nothing measured
                    self.on_record()


def _put_times(rec: dict, kern: autotune.Timing, base: autotune.Timing) -> None:
    """kernel_us / xla_bf16_us: the GPU kernels' own time (CUPTI) where available, else wall clock."""
    rec["timing"] = "cupti" if kern.device_us is not None and base.device_us is not None else "wall"
    pick = (lambda t: t.device_us) if rec["timing"] == "cupti" else (lambda t: t.wall_us)  # noqa: E731
    rec["kernel_us"], rec["xla_bf16_us"] = pick(kern), pick(base)
    rec["kernel_wall_us"], rec["xla_bf16_wall_us"] = kern.wall_us, base.wall_us


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(records: list[dict], meta: dict) -> str:
    timing = meta.get("timing_note", "the GPU kernels' own time (CUPTI) where a record says "
                                     "timing=cupti, else wall clock")
    lines = [f"# Fused low-bit matmul vs XLA bf16 ({meta.get('card', '?')})", "",
             f"jax {meta.get('jax', '?')}, commit {meta.get('commit', '?')}; copy bandwidth "
             f"{meta.get('copy_bandwidth_GBps', 0):.0f} GB/s, bf16 matmul {meta.get('matmul_TFLOPs', 0):.0f} "
             "TFLOP/s (both measured in the run). Times are per call: `kernel us` and `XLA bf16 us` "
             f"are {timing}; `wall` is the wall clock of many calls in one jitted function divided "
             "by the calls (weights cycling through buffers larger than the L2). Roofline = "
             "max(bytes / copy bandwidth, flops / matmul rate) / kernel time.", "",
             "| variant | K | N | M | kernel us | XLA bf16 us | speedup | roofline | GB/s "
             "| wall: kernel / bf16 / dequant us | rel err | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("invalid"):
            lines.append(f"| {r['variant']} | {r['k']} | {r['n']} | {r['m']} | INVALID timing: "
                         f"{'; '.join(r['invalid'])} | | | | | | | |")
            continue
        if r.get("kernel_us") is None:
            lines.append(f"| {r['variant']} | {r['k']} | {r['n']} | {r['m']} | failed: {r.get('error', '?')} |"
                         " | | | | | | |")
            continue
        cfg = r["config"]
        if r.get("kind") == "wgmma":
            short = (f"wgmma tn{cfg['tile_n']} tk{cfg['tile_k']} s{cfg['splits']} st{cfg['stages']}"
                     f"{' m' + str(cfg['tile_m']) if cfg['tile_m'] else ''}{' ws' if cfg['warp_specialized'] else ''}")
            lines.append(_row(r, short))
            continue
        path = "tiledot" if cfg.get("tile_dot") else "dot" if cfg["use_dot"] else "gemv"
        path += f"-{cfg.get('dequant', 'shift')}"
        path += "-acc2d" if cfg.get("acc2d") else ""
        path += "-prefetch" if cfg.get("prefetch") else ""
        short = (f"{path} bm{cfg['block_m']} bn{cfg['block_n']} "
                 f"s{cfg['split_k']} u{cfg['tiles_per_step']} w{cfg['num_warps']}")
        lines.append(_row(r, short))
    return "\n".join(lines) + "\n"


def _row(r: dict, config: str) -> str:
    """A timed record's line of the markdown table."""
    deq = f" / {r['xla_dequant_wall_us']:.1f}" if "xla_dequant_wall_us" in r else ""
    wall = f"{r.get('kernel_wall_us', r['kernel_us']):.1f} / {r.get('xla_bf16_wall_us', r['xla_bf16_us']):.1f}{deq}"
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
    return (f"| {r['variant']} | {r['k']} | {r['n']} | {r['m']} | {r['kernel_us']:.1f} | "
            f"{r['xla_bf16_us']:.1f} | {r['speedup']:.2f}x | {r['roofline_fraction']:.0%} | "
            f"{r['bandwidth_GBps']:.0f} | {wall} | {err} | {config} |")


def plot(records: list[dict], path: str, card: str, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_variant: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r.get("speedup") is not None:
            by_variant.setdefault(r["variant"], {}).setdefault(r["m"], []).append(r["speedup"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(by_variant.items()):
        ms = sorted(pts)
        if len(ms) < 2:
            continue
        geo = [float(jnp.exp(jnp.mean(jnp.log(jnp.asarray(pts[m]))))) for m in ms]
        ax.plot(ms, geo, marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (tokens per call)")
    ax.set_ylabel("speedup over XLA bf16 (geometric mean over shapes)")
    ax.set_title(f"Fused low-bit matmul, Llama-2/Mistral-7B projection shapes, {card}"
                 + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
