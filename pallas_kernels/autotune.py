"""Block sizes per problem: a small autotuner, its timing harness, and the cached choices.

A *problem* is what decides the best blocks: activation kind (bf16/fp16 or int8), bits, group
size, grid (symmetric / asymmetric / codebook), layout, K, N and the batch bucket (M rounded up
to 1, 2, 4, ..., 256). For each problem the tuner times a handful of candidates (GEMV and
tensor-core paths, a few block shapes and K splits) on fresh random weights of the real shape
and keeps the fastest, together with the time of the XLA path (dequantize, then cuBLAS): the
dispatch uses the kernel only where it measured faster.

Choices live in JSON tables: `quant_matmul_tuning.json` beside this file (measured on the
project's GPU by `scripts/bench_kernels.py`, shipped) and a per-user cache
(`$JAXCOMPRESS_TUNING_CACHE`, default `~/.cache/jaxcompress/quant_matmul_tuning.json`) that
runtime tuning (`JAXCOMPRESS_AUTOTUNE=1`) adds to.

Timing follows GPU.md: many calls (>= 96) inside one jitted function, the weights cycling
through buffers that together exceed the L2, each call with its own activations; the median of
several runs gives the wall clock per call, and CUPTI (on GPUs) the kernels' own time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.io.atomic import write_json
from jaxcompress.quant.qarray import QArray
from pallas_kernels.layout import CodeLayout, TiledQArray, kernel_layout
from pallas_kernels.quant_matmul import TileConfig, config_problem

log = logging.getLogger(__name__)

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHIPPED_TABLE = Path(__file__).with_name("quant_matmul_tuning.json")
CACHE_ENV = "JAXCOMPRESS_TUNING_CACHE"
AUTOTUNE_ENV = "JAXCOMPRESS_AUTOTUNE"
L2_DEFEAT_BYTES = 192 << 20  # weights touched per timed call sequence: several times the L2 (50-60 MB)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (batches above the largest share its entry)."""
    return next((b for b in M_BUCKETS if b >= m), M_BUCKETS[-1])


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # "a16" (bf16/fp16 activations) or "a8" (int8 activations)
    bits: int
    group_size: int  # 0 when the whole matrix is one group (per channel / per tensor)
    grid: str  # "sym", "asym" or "lut"
    layout: str  # "native" or "tiled"
    rows: int
    k: int
    n: int
    m: int  # batch bucket

    def family(self) -> tuple:
        return (self.kind, self.bits, self.group_size, self.grid, self.layout, self.rows)


def problem_of(w: QArray | TiledQArray, m: int, kind: str = "a16", lay: CodeLayout | None = None) -> Problem:
    lay = lay or kernel_layout(w)
    grid = "lut" if w.codebook is not None else "asym" if w.zero is not None else "sym"
    return Problem(kind, lay.bits, 0 if lay.num_groups == 1 else lay.group_size, grid,
                   "native" if lay.interleaved else "tiled", lay.rows, lay.k, lay.n, m_bucket(m))


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def _sized(lay: CodeLayout, m: int, bn: int, bm: int, dot: bool, warps: int, stages: int,
           target_programs: int, max_tiles_per_step: int, tile_dot: bool = False,
           dequant: str = "shift", acc2d: bool = False, uneven: bool = True) -> TileConfig:
    """A config with split_k raised until the grid has `target_programs` and the largest
    tiles_per_step <= the cap that divides each split."""
    programs = -(-m // bm) * max(lay.n // bn, 1)
    split = 1
    while programs * split < target_programs and lay.num_tiles % (2 * split) == 0 and split < 16:
        split *= 2
    per = lay.num_tiles // split
    step = max(d for d in range(1, max_tiles_per_step + 1) if per % d == 0)
    if programs * split < target_programs and uneven:
        # Even splits stop short (K = 11008 is 86 = 2 x 43 tiles): split into whole steps with
        # a shorter last split instead.
        step = max(d for d in range(1, max_tiles_per_step + 1) if lay.num_tiles % d == 0)
        steps = lay.num_tiles // step
        split = max(1, min(16, -(-target_programs // programs), steps))
        while split > 1 and (split - 1) * -(-steps // split) >= steps:
            split -= 1
    return TileConfig(block_n=bn, block_m=bm, use_dot=dot, split_k=split, tiles_per_step=step,
                      num_warps=warps, num_stages=stages, tile_dot=tile_dot, dequant=dequant, acc2d=acc2d)


class GemvSpec(NamedTuple):
    """A GEMV candidate before sizing: K is split until the grid has `target` programs."""

    block_n: int
    block_m: int
    warps: int
    target: int  # programs in the grid
    max_tiles_per_step: int
    dequant: str
    acc2d: bool
    stages: int = 1
    prefetch: bool = False


def gemv_specs(bm: int, sms: int) -> list[GemvSpec]:
    """GEMV candidates, likeliest first. Run 2 (H200): wide blocks with K split to ~4 programs per
    SM won; block_n=16 never did. Runs 3-5: the in-place dequantization with 2-D accumulators won
    most shapes and stays as the reference; "fma" (22% fewer instructions in the loop than
    "inplace" by the SASS count, docs/results/kernel_notes.md) won runs 6-7. "h2" (code pairs in
    f16x2: 20% fewer than "fma") comes first, with and without the loads issued a step ahead
    (prefetch; fewer programs, each walking more steps, so its loads overlap its arithmetic).
    Without a K split (no second kernel for the partial sums) h2 lost 1.3-3.5x on the large
    shapes (kernel_notes.md, run 8d): too few programs; none are proposed."""
    g = GemvSpec
    specs = [g(64, bm, 4, 4 * sms, 2, "h2", True), g(64, bm, 4, 2 * sms, 2, "h2", True, prefetch=True),
             g(128, bm, 4, 2 * sms, 1, "h2", True, prefetch=True), g(64, bm, 4, 4 * sms, 1, "h2", True, prefetch=True),
             g(128, bm, 8, 2 * sms, 2, "h2", True, prefetch=True), g(256, bm, 8, 2 * sms, 1, "h2", True, prefetch=True),
             g(64, bm, 4, 4 * sms, 2, "fma", True), g(64, bm, 4, 4 * sms, 2, "inplace", True),
             g(128, bm, 4, 4 * sms, 2, "fma", True), g(64, bm, 4, 4 * sms, 2, "fma", False),
             g(128, bm, 8, 2 * sms, 2, "fma", True), g(64, bm, 4, 2 * sms, 2, "fma", True, prefetch=True),
             g(32, bm, 4, 2 * sms, 4, "fma", True), g(256, bm, 8, 4 * sms, 2, "fma", True),
             g(64, bm, 4, 8 * sms, 1, "fma", True), g(128, bm, 4, 4 * sms, 2, "shift", False),
             g(64, bm, 4, 4 * sms, 2, "shift", False),
             g(64, bm, 4, 4 * sms, 1, "fma", True, stages=3)]  # num_stages=3: Triton's loop pipelining
    if bm > 2:  # [rows, block_n] accumulators per row of x cost registers: keep the 1-D ones too
        specs = [s for s in specs if s.block_m <= 2 or not s.acc2d or s.block_n <= 64] + \
                [g(128, bm, 4, 4 * sms, 2, "fma", False)]
    return specs


def candidates(lay: CodeLayout, m: int, *, sms: int = 132, int8: bool = False) -> list[TileConfig]:
    """A few configs worth timing for this layout and batch (all valid), likeliest first."""
    min_k = 32 if int8 else 16
    # (block_n, block_m, dot, warps, stages, programs, max tiles per step, tile_dot, dequant, acc2d, prefetch)
    specs = []
    if not int8 and (m <= 8 or lay.rows < min_k):
        for sp in gemv_specs(min(m, 8), sms):
            dq = sp.dequant
            if dq in ("inplace", "fma", "h2") and not lay.in_place:
                dq = "shift"  # codes straddling words (3 bits) or indexing a codebook: the shift path only
            if dq == "h2" and lay.slabs_per_group != lay.period:
                dq = "fma"  # groups smaller than a tile: the pairs of a word would span two groups
            specs.append((sp.block_n, sp.block_m, False, sp.warps, sp.stages, sp.target, sp.max_tiles_per_step,
                          False, dq, sp.acc2d, sp.prefetch))
    if lay.rows >= min_k and (m >= 4 or int8):
        tile = not int8  # the int8 kernel has no whole-tile dot
        if m <= 16:
            dots = [(64, 16, True, 4, 2, 2 * sms, 2, False), (128, 16, True, 4, 2, 2 * sms, 2, False),
                    (64, 16, True, 4, 2, 2 * sms, 1, tile), (32, 16, True, 4, 2, 4 * sms, 4, False),
                    (128, 16, True, 8, 2, 2 * sms, 1, tile)]
        elif m <= 64:
            bm = 32 if m <= 32 else 64
            dots = [(64, bm, True, 4, 2, 2 * sms, 2, False), (128, bm, True, 4, 3, 2 * sms, 1, tile),
                    (64, 16, True, 4, 2, 2 * sms, 2, False), (128, bm, True, 8, 3, sms, 1, False),
                    (64, bm, True, 4, 3, 2 * sms, 1, tile)]
        else:
            dots = [(128, 64, True, 4, 3, sms, 1, False), (128, 64, True, 4, 3, sms, 1, tile),
                    (128, 128, True, 8, 3, sms, 1, tile), (128, 128, True, 8, 3, sms, 1, False),
                    (64, 64, True, 4, 3, sms, 1, False), (256, 64, True, 8, 3, sms, 1, tile)]
        # The in-place FMA conversion where the codes allow it (27% fewer instructions a step
        # on the whole-tile dot, by the SASS count); one shift candidate stays as the reference.
        fma = not int8 and lay.in_place
        dots = [(*d, "fma" if fma else "shift", False, False) for d in dots] + \
            ([(*dots[0], "shift", False, False)] if fma else [])
        # Batch 4-8: interleave, so a candidate cap keeps both paths.
        specs = [s for pair in zip(specs, dots) for s in pair] + specs[len(dots):] + dots[len(specs):] \
            if specs else dots
    out = []
    for bn, bm, dot, warps, stages, target, steps, tile_dot, dq, acc2d, prefetch in specs:
        while bn > 16 and lay.n % bn:
            bn //= 2
        cfg = _sized(lay, m, bn, bm, dot, warps, stages, target, steps, tile_dot, dq, acc2d, uneven=not int8)
        cfg = dataclasses.replace(cfg, prefetch=prefetch)
        if cfg not in out and config_problem(cfg, lay, m, min_dot_k=min_k, even_split=int8) is None:
            out.append(cfg)
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


MIN_CALLS = 96  # calls per timed execution: its fixed host cost (~0.1-0.3 ms) shrinks to ~1-3 us a call


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call time of one function, two ways."""

    wall_us: float  # wall clock of many calls in one execution / calls (kernel gaps included)
    device_us: float | None = None  # sum of the GPU kernels' own durations (CUPTI) / calls
    kernels: dict | None = None  # per-call CUPTI time of each kernel, by name (when asked)

    @property
    def best_estimate_us(self) -> float:
        return self.device_us if self.device_us is not None else self.wall_us


def rank_us(t: Timing) -> float:
    """What candidates (and the kernel against XLA's path) are ranked by: the kernels' own time
    (CUPTI, split-K pass included) where available, else the wall clock. A model's decode step
    is device-bound (run 9b: 2.97 ms of kernels in a 3.07 ms step, ~0.2 us of gap a launch),
    while this benchmark's back-to-back calls are host-bound for kernels this short (27 us of
    wall for 15 us of kernels): ranked by the wall clock, run 10c kept a config 22% slower on
    the device (kernel_notes.md)."""
    return t.best_estimate_us


def buffers_for(nbytes: int, cap: int = 64) -> int:
    """How many distinct weight buffers keep a call sequence out of the L2 cache."""
    return max(2, min(cap, math.ceil(L2_DEFEAT_BYTES / max(nbytes, 1))))


def lower_calls(fn: Callable, xs: Sequence, ws: Sequence):
    """One jitted function applying `fn` to (xs[i], ws[i % len(ws)]) for every i, lowered.

    Each call has its own activations and the weights cycle through buffers that together
    exceed the L2. Each call's (x, w) pass through their own `optimization_barrier`, so every
    call's weight is a distinct HLO value: without it, XLA's dot merger batched the bf16
    baseline's calls that shared a weight buffer into one dot (run 2: 1-5 us for a 90 MB
    weight, below the bandwidth floor). Every call's output is an output of the function, so
    none can be dropped. `fn` is jitted on its own so its kernel is lowered once."""
    inner = jax.jit(fn)

    def calls(xs, ws):
        outs = []
        for i, x in enumerate(xs):
            x, w = jax.lax.optimization_barrier((x, ws[i % len(ws)]))
            outs.append(inner(x, w))
        return outs

    return jax.jit(calls).lower(xs, ws)


_CUPTI_BROKEN: list[str] = []


def _device_us(compiled, xs, ws, reps: int) -> float | None:
    """Per-call GPU kernel time from CUPTI (Mosaic GPU's profiler), or None where unavailable."""
    if jax.default_backend() != "gpu" or _CUPTI_BROKEN:
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, ms = profiler.measure(compiled, aggregate=True, iterations=reps)(xs, ws)
    except Exception as e:  # no CUPTI here (or an API change): say so once, keep the wall clock
        _CUPTI_BROKEN.append(f"{type(e).__name__}: {e}")
        log.warning("no CUPTI kernel timings (%s: %s); reporting wall clock only", type(e).__name__, e)
        return None
    if ms is None:
        return None
    ms = ms if isinstance(ms, list) else [ms]
    return 1e3 * statistics.median(ms) / len(xs)


def device_breakdown(compiled, xs, ws) -> dict[str, float] | None:
    """Per-call GPU time of each kernel (by name) of a `lower_calls` function, from CUPTI."""
    if jax.default_backend() != "gpu" or _CUPTI_BROKEN:
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, timings = profiler.measure(compiled, aggregate=False)(xs, ws)
    except Exception as e:
        log.warning("no CUPTI per-kernel timings (%s: %s)", type(e).__name__, e)
        return None
    out: dict[str, float] = {}
    for name, ms in timings or []:
        out[name] = out.get(name, 0.0) + 1e3 * ms / len(xs)
    # Fewer kernel launches than calls means XLA merged calls: the timing is not per call.
    out[LAUNCHES_KEY] = len(timings or []) / len(xs)
    return out


LAUNCHES_KEY = "_launches_per_call"


def measure(compiled, xs: Sequence, ws: Sequence, reps: int = 7) -> Timing:
    """Times a `lower_calls(...).compile()` function: warm-up, then the median of reps."""
    jax.block_until_ready(compiled(xs, ws))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(xs, ws))
        times.append(time.perf_counter() - t0)
    wall = 1e6 * statistics.median(times) / len(xs)
    return Timing(wall, _device_us(compiled, xs, ws, reps))


def time_per_call(fn: Callable, xs: Sequence, ws: Sequence, reps: int = 7,
                  breakdown: bool = False) -> Timing:
    """Per-call time of `fn(x, w)` over all the given activations (weights cycled); with
    `breakdown`, also each kernel's share (CUPTI)."""
    compiled = lower_calls(fn, xs, ws).compile()
    t = measure(compiled, xs, ws, reps)
    return dataclasses.replace(t, kernels=device_breakdown(compiled, xs, ws)) if breakdown else t


def time_candidates(fns: Sequence[Callable], xs: Sequence, ws: Sequence, reps: int = 7,
                    threads: int = 8) -> list:
    """Timing of each fn (or the exception that stopped it); compiles in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    lowered = []
    for fn in fns:
        try:
            lowered.append(lower_calls(fn, xs, ws))
        except Exception as e:  # returned to the caller, which reports it
            lowered.append(e)

    def compile_one(low):
        if isinstance(low, Exception):
            return low
        try:
            return low.compile()
        except Exception as e:
            return e

    with ThreadPoolExecutor(max(1, min(threads, len(fns)))) as pool:
        compiled = list(pool.map(compile_one, lowered))
    out = []
    for c in compiled:
        if isinstance(c, Exception):
            out.append(c)
            continue
        try:
            out.append(measure(c, xs, ws, reps))
        except Exception as e:
            out.append(e)
    return out


def random_like(w, key: jax.Array):
    """A weight (QArray, TiledQArray, W4Weight) with w's structure and fresh random contents (timing
    data; any bits are valid codes)."""
    leaves, treedef = jax.tree_util.tree_flatten(w)
    keys = jax.random.split(key, len(leaves))
    new = []
    for leaf, k in zip(leaves, keys):
        if leaf.dtype == jnp.uint32:
            new.append(jax.random.bits(k, leaf.shape, jnp.uint32))
        elif leaf.dtype == jnp.int4:  # W4Weight code planes (4-, 3- and 2-bit codes): every int4 is valid
            new.append(jax.random.randint(k, leaf.shape, -8, 8, jnp.int8).astype(jnp.int4))
        elif leaf.dtype == jnp.int8:  # 8-bit W4Weight codes: fresh ones, or every buffer shares (and caches) them
            new.append(jax.random.randint(k, leaf.shape, -128, 128, jnp.int8))
        elif jnp.issubdtype(leaf.dtype, jnp.integer):  # perm / outlier indices: keep them valid
            new.append(leaf)
        else:
            new.append(jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 1.5).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def random_inputs(w, m: int, dtype, seed: int = 0, nbytes: int | None = None, min_calls: int = MIN_CALLS,
                  n_buf: int | None = None):
    """(xs, ws): distinct random activations for each call, and enough weight buffers to
    defeat the L2 (random data in w's structure, or dense [K, N] arrays when w is a shape);
    `n_buf` forces the number of weight buffers (= min_calls: every call its own weight)."""
    nbytes = nbytes or sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(w))
    n_buf = n_buf or buffers_for(nbytes)
    n_calls = max(n_buf, min_calls)
    keys = jax.random.split(jax.random.key(seed), n_buf + n_calls)
    if isinstance(w, tuple):  # a dense (K, N) bf16 weight
        ws = [0.02 * jax.random.normal(keys[i], w, jnp.float32).astype(dtype) for i in range(n_buf)]
        k = w[0]
    else:
        ws = [random_like(w, keys[i]) for i in range(n_buf)]
        k = w.shape[0]
    xs = [jax.random.normal(keys[n_buf + i], (m, k), jnp.float32).astype(dtype) for i in range(n_calls)]
    return xs, ws


def tune(w: QArray | TiledQArray, m: int, dtype=jnp.bfloat16, *, kind: str = "a16",
         seed: int = 0) -> tuple[TileConfig | None, list[dict]]:
    """Times every candidate on fresh random data; returns (best config, per-candidate results)."""
    from pallas_kernels.int8_matmul import int8_layout, int8_matmul
    from pallas_kernels.quant_matmul import quant_matmul

    int8 = kind == "a8"
    lay = int8_layout(w) if int8 else kernel_layout(w)
    matmul = int8_matmul if int8 else quant_matmul
    xs, ws = random_inputs(w, m, dtype, seed)
    cands = candidates(lay, m, sms=num_sms(), int8=int8)
    fns = [functools.partial(lambda x, ww, c: matmul(x, ww, config=c), c=cfg) for cfg in cands]
    results = []
    for cfg, res in zip(cands, time_candidates(fns, xs, ws)):
        if isinstance(res, Exception):  # a candidate that fails to compile is reported and skipped
            msg = str(res).splitlines()[0][:300] if str(res) else type(res).__name__
            log.warning("candidate %s failed: %s", cfg, msg)
            results.append({"config": cfg.to_json(), "error": msg})
        else:
            results.append({"config": cfg.to_json(), "us": rank_us(res), "wall_us": res.wall_us,
                            "device_us": res.device_us})
    ok = [r for r in results if "us" in r]
    best = TileConfig.from_json(min(ok, key=lambda r: r["us"])["config"]) if ok else None
    return best, results


# --------------------------------------------------------------------------------------------
# Tables of choices
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    problem: Problem
    config: TileConfig | None  # None: no candidate ran
    kernel_us: float | None = None
    xla_us: float | None = None  # dequantize + XLA dot on the same data

    @property
    def use_kernel(self) -> bool:
        if self.config is None:
            return False
        return self.xla_us is None or self.kernel_us is None or self.kernel_us <= self.xla_us

    def to_json(self) -> dict:
        return {"problem": dataclasses.asdict(self.problem),
                "config": self.config.to_json() if self.config else None,
                "kernel_us": self.kernel_us, "xla_us": self.xla_us}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        cfg = TileConfig.from_json(d["config"]) if d.get("config") else None
        return cls(Problem(**d["problem"]), cfg, d.get("kernel_us"), d.get("xla_us"))


class TuningTable:
    """Entries keyed by problem; `lookup` falls back to the nearest K, N of the same family."""

    def __init__(self, entries: Sequence[Entry] = (), meta: dict | None = None):
        self.entries = {e.problem: e for e in entries}
        self.meta = dict(meta or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TuningTable":
        if not os.path.exists(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return cls([Entry.from_json(e) for e in d.get("entries", [])], d.get("meta"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(str(path), {"meta": self.meta,
                               "entries": [e.to_json() for e in self.entries.values()]})

    def add(self, entry: Entry) -> None:
        self.entries[entry.problem] = entry

    def merge(self, other: "TuningTable") -> None:
        self.entries.update(other.entries)

    def lookup(self, p: Problem, lay: CodeLayout, m: int, *, int8: bool = False) -> Entry | None:
        """The entry of problem p; else the nearest K, N of its family whose blocks fit; else
        the same from the other uniform grid (a zero point costs one subtraction a weight)."""
        exact = self.entries.get(p)
        if exact is not None:
            return exact
        dist = lambda e: abs(math.log(e.problem.k / p.k)) + abs(math.log(e.problem.n / p.n))  # noqa: E731
        families = [p.family()]
        if p.grid in ("sym", "asym"):
            families.append(dataclasses.replace(p, grid="asym" if p.grid == "sym" else "sym").family())
        for family in families:
            same = [e for e in self.entries.values() if e.problem.family() == family
                    and e.problem.m == p.m and e.config is not None]
            for e in sorted(same, key=dist):
                if config_problem(e.config, lay, m, min_dot_k=32 if int8 else 16, even_split=int8) is None:
                    return e
        return None


_TABLE: TuningTable | None = None


def cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "jaxcompress" / "quant_matmul_tuning.json"))


def table() -> TuningTable:
    """The shipped table overlaid with the user's cache (loaded once per process)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = TuningTable.load(SHIPPED_TABLE)
        _TABLE.merge(TuningTable.load(cache_path()))
    return _TABLE


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0", "false", "False")


def tune_and_record(w, m: int, dtype=jnp.bfloat16, *, kind: str = "a16") -> Entry:
    """Tunes one problem, times the XLA path beside it, and adds the result to the user cache."""
    from jaxcompress.ops.linear import dense_linear
    from pallas_kernels.int8_matmul import int8_layout

    lay = int8_layout(w) if kind == "a8" else kernel_layout(w)
    best, results = tune(w, m, dtype, kind=kind)
    xs, ws = random_inputs(w, m, dtype, seed=1)
    xla = rank_us(time_per_call(lambda x, ww: dense_linear(x, ww.dequantize()), xs, ws))
    kernel_us = min((r["us"] for r in results if "us" in r), default=None)
    entry = Entry(problem_of(w, m, kind, lay), best, kernel_us, xla)
    table().add(entry)
    user = TuningTable.load(cache_path())
    user.add(entry)
    user.save(cache_path())
    return entry
