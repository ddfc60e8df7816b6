"""The fused low-bit matmul kernels in Pallas interpret mode (CPU), against the references.

Every case draws fresh random weights and activations, pre-fills the kernel's output with NaN
(an element never written stays NaN), and checks the result against both the library
reference (dequantize to bf16, bf16 matmul with fp32 accumulation) and a float64 host
product of the exact fp32 weights.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.ops.linear import dense_linear, linear
from jaxcompress.quant import kernels_dispatch
from jaxcompress.quant.qarray import SUPPORTED_BITS, QArray
from pallas_kernels import autotune
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference
from pallas_kernels.layout import grid_values_at, repack_for_gpu
from pallas_kernels.quant_matmul import (TileConfig, config_problem, default_config, quant_matmul,
                                         quant_matmul_reference)
from pallas_kernels.testing import (Variant, abstract_weight, float64_reference, random_activations,
                                    random_qarray, random_weight, relative_error)
from script_loader import load_script

TOL = 1e-2
GEMV = lambda bn=32, m=1, split=1, step=1, dq="shift", acc2d=False, pre=False: TileConfig(  # noqa: E731
    block_n=bn, block_m=m, split_k=split, tiles_per_step=step, dequant=dq, acc2d=acc2d, prefetch=pre)
GEMM = lambda bn=32, bm=16, split=1, step=1, tile=False, dq="shift": TileConfig(  # noqa: E731
    block_n=bn, block_m=bm, use_dot=True, split_k=split, tiles_per_step=step, tile_dot=tile, dequant=dq)

# (variant, K, N, x leading shape, config, activation dtype): each line covers a layout x path x
# edge case; together they write every output element under NaN poison.
CASES = [
    (Variant(4, 128), 256, 64, (1, 3), GEMV(m=3, split=2), jnp.bfloat16),  # [B, T, K] x, split-K partials
    (Variant(4, 128, "asym"), 256, 64, (5,), GEMM(bn=16, step=2), jnp.float16),  # M < block_m, fp16
    (Variant(4, 32, "asym", tiled_rows=32), 512, 64, (17,), GEMM(split=2), jnp.bfloat16),  # 2 M blocks
    (Variant(8, 0), 256, 64, (16,), GEMM(split=2), jnp.bfloat16),  # per channel
    (Variant(3, 128), 256, 32, (1,), GEMV(), jnp.bfloat16),  # codes straddle words
    (Variant(2, 0, "asym", tiled_rows=16), 320, 32, (16,), GEMM(tile=True), jnp.bfloat16),  # K padded to 512
    (Variant(4, 0, "lut"), 256, 64, (1,), GEMV(), jnp.bfloat16),  # SqueezeLLM codebook
    (Variant(4, 128, "lut_scaled"), 256, 64, (16,), GEMM(tile=True), jnp.bfloat16),  # NF4-style, one dot a tile
    (Variant(4, 128, act_order=True, outliers=40), 256, 64, (2,), GEMV(m=2), jnp.bfloat16),
    # dequant="inplace" (codes masked where they lie, x scaled by 2**-offset) and 2-D accumulators
    (Variant(4, 128, "asym"), 512, 32, (2,), GEMV(m=2, split=2, step=2, dq="inplace", acc2d=True), jnp.bfloat16),
    (Variant(8, 0), 256, 32, (1,), GEMV(dq="inplace"), jnp.float16),  # one group, 2 codes shifted
    # 16 codes a word; 3 tiles in 2 K splits: the last split is shorter (a run-time loop bound)
    (Variant(2, 128), 384, 32, (1,), GEMV(split=2, dq="inplace", acc2d=True), jnp.bfloat16),
    # dequant="fma" (code -> float by one FMA; zero points through per-segment sums of x)
    (Variant(4, 128, "asym"), 640, 32, (3,), GEMV(m=3, split=3, dq="fma"), jnp.bfloat16),  # 5 tiles, 3 splits
    (Variant(4, 32, "asym", tiled_rows=16), 256, 32, (1,), GEMV(dq="fma", acc2d=True), jnp.bfloat16),  # 4 groups a tile
    (Variant(8, 0, "asym"), 256, 32, (2,), GEMV(m=2, split=2, dq="fma", acc2d=True), jnp.float16),  # one group, 2 tiles
    (Variant(2, 128), 384, 32, (1,), GEMV(split=2, dq="fma", acc2d=True), jnp.bfloat16),
    (Variant(4, 128, "asym", act_order=True, outliers=40), 256, 64, (2,), GEMV(m=2, dq="fma"), jnp.bfloat16),
    # dequant="h2" (code pairs in f16x2, x scaled per program by a power of two)
    (Variant(4, 128), 640, 32, (1,), GEMV(split=3, dq="h2", acc2d=True), jnp.bfloat16),  # 5 tiles, 3 splits
    # ... with the next step's loads issued a step ahead: splits of 2, 2 and 1 steps, 8 and 4 pairs
    (Variant(4, 128), 640, 32, (2,), GEMV(m=2, split=3, dq="h2", acc2d=True, pre=True), jnp.bfloat16),
    (Variant(2, 128, "asym"), 768, 32, (1,), GEMV(split=2, step=1, dq="h2", acc2d=True, pre=True), jnp.float16),
    (Variant(4, 128, "asym"), 512, 32, (1,), GEMV(step=2, dq="h2", acc2d=True, pre=True), jnp.bfloat16),  # no K split
    (Variant(4, 128, "asym"), 640, 32, (1,), GEMV(split=2, dq="fma", acc2d=True, pre=True), jnp.bfloat16),
    (Variant(4, 128, "asym"), 256, 64, (3,), GEMV(m=3, split=2, dq="h2", acc2d=True), jnp.float16),
    (Variant(8, 0), 256, 32, (2,), GEMV(m=2, dq="h2", acc2d=True), jnp.bfloat16),  # one group: scale at the end
    (Variant(2, 128), 384, 32, (1,), GEMV(split=2, dq="h2", acc2d=True), jnp.bfloat16),  # 8 pairs a word
    (Variant(2, 0, "asym", tiled_rows=16), 320, 32, (1,), GEMV(dq="h2", acc2d=True), jnp.bfloat16),  # K padded
    (Variant(4, 128, act_order=True, outliers=40), 256, 64, (2,), GEMV(m=2, dq="h2", acc2d=True), jnp.bfloat16),
    # ... and on the tensor-core paths (per-slab dots, whole-tile dots)
    (Variant(4, 32, "asym", tiled_rows=32), 512, 64, (17,), GEMM(split=2, dq="fma"), jnp.bfloat16),
    (Variant(2, 0, "asym", tiled_rows=16), 320, 32, (16,), GEMM(tile=True, dq="fma"), jnp.float16),
    (Variant(4, 128), 256, 64, (5,), GEMM(bn=16, tile=True, dq="fma"), jnp.bfloat16),
]


def _path(cfg):
    if cfg.use_dot:
        return ("tiledot" if cfg.tile_dot else "dot") + ("-fma" if cfg.dequant == "fma" else "")
    return f"gemv-{cfg.dequant}" + ("-acc2d" if cfg.acc2d else "") + ("-prefetch" if cfg.prefetch else "")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-M{np.prod(c[3])}-{_path(c[4])}")
def test_kernel_matches_references(case):
    v, k, n, lead, cfg, dtype = case
    seed = zlib.crc32(v.name.encode())
    w = random_weight(seed, k, n, v)
    x = random_activations(seed, (*lead, k), dtype)
    y = quant_matmul(x, w, config=cfg, interpret=True, poison=float("nan"))
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert not np.isnan(np.asarray(y, np.float32)).any(), "an output element was never written"
    assert relative_error(y, jax.jit(quant_matmul_reference)(x, w)) <= TOL
    assert relative_error(y, float64_reference(x, w)) <= TOL


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_repack_round_trip(bits):
    """The tiled layout holds the same weight: dequantize() and the codes survive the round trip."""
    q = random_qarray(bits, 320, 48, Variant(bits, 64, "asym"))
    t = repack_for_gpu(q, rows=16)
    assert t.codes.shape[0] == t.layout.k_padded * bits // 32
    np.testing.assert_array_equal(np.asarray(t.dequantize(), np.float32), np.asarray(q.dequantize(), np.float32))
    np.testing.assert_array_equal(np.asarray(t.to_qarray().codes), np.asarray(q.codes))


@pytest.mark.parametrize("case", [
    (Variant(8, 0), 256, 64, 16, GEMM(bn=32)),  # W8A8, the QArray as stored
    (Variant(4, 128, "asym", tiled_rows=32), 512, 64, 5, GEMM(bn=16, split=2)),  # W4A8, repacked
], ids=["w8a8", "w4a8-asym-split"])
def test_int8_activation_kernel(case):
    v, k, n, m, cfg = case
    w = random_weight(7, k, n, v)
    x = random_activations(8, (m, k))
    y = int8_matmul(x, w, config=cfg, interpret=True, poison=float("nan"))
    assert not np.isnan(np.asarray(y, np.float32)).any()
    assert relative_error(y, int8_matmul_reference(x, w)) <= TOL
    # Per-token int8 activations cost about 1/127 of each row's range: well under 2e-2 here.
    assert relative_error(y, float64_reference(x, w)) <= 2e-2


def test_errors_name_the_dimension_and_block():
    """Shape, dtype and block errors are raised while tracing (checked on abstract weights)."""
    def raises(match, w, x, **kw):
        fn = kw.pop("fn", quant_matmul)
        with pytest.raises(UserError, match=match):
            jax.eval_shape(lambda: fn(jnp.zeros(x, kw.pop("dtype", jnp.bfloat16)), w, interpret=True, **kw))

    w = abstract_weight(256, 48, Variant(4, 128))
    raises(r"N=48 must be a multiple of block_n=32", w, (1, 256), config=GEMV(bn=32))
    raises(r"dtype float32", w, (1, 256), dtype=jnp.float32)
    raises(r"K=256", w, (1, 128))
    raises(r"block_m=8 must be a power of two >= 16", w, (1, 256), config=GEMM(bn=16, bm=8))
    raises(r"split_k=3", w, (1, 256), config=GEMV(bn=16, split=3))
    raises(r"slabs of >= 16 rows.*rows=8", abstract_weight(256, 64, Variant(4, 64)), (1, 256), config=GEMM())
    # K=196: not whole periods of 8 codes
    raises(r"K=196 must be a multiple of the tile of 8 rows", abstract_weight(196, 64, Variant(4, 0)), (1, 196))
    raises(r"tile_dot needs one group per tile of 128 rows; group_size=32",
           abstract_weight(256, 64, Variant(4, 32, tiled_rows=16)), (1, 256), config=GEMM(tile=True))
    raises(r"slabs of 32 rows.*rows=16.*repack_for_gpu", w, (1, 256), fn=int8_matmul)
    for dq in ("inplace", "fma"):
        raises(rf"dequant='{dq}' needs codes that never straddle a word.*bits=3",
               abstract_weight(256, 64, Variant(3, 128)), (1, 256), config=GEMV(dq=dq))
    raises(r"dequant='fma' turns codes into uniform-grid values; this weight has a codebook",
           abstract_weight(256, 64, Variant(4, 0, "lut")), (1, 256), config=GEMV(dq="fma"))
    raises(r"GEMV-path options", w, (16, 256), config=dataclasses.replace(GEMM(bn=16), acc2d=True))


def test_linear_dispatch_on_cpu(monkeypatch):
    """On a CPU, linear() runs the reference; `interpret` runs the kernel; `kernel` refuses."""
    w = random_qarray(1, 256, 64, Variant(4, 128, "asym"))
    x = random_activations(2, (2, 256))
    ref = dense_linear(x, w.dequantize())
    np.testing.assert_array_equal(np.asarray(linear(x, w), np.float32), np.asarray(ref, np.float32))
    monkeypatch.setenv(kernels_dispatch.MODE_ENV, "interpret")
    assert relative_error(linear(x, w), ref) <= TOL
    monkeypatch.setenv(kernels_dispatch.MODE_ENV, "kernel")
    with pytest.raises(UserError, match="no NVIDIA GPU"):
        linear(x, w)
    monkeypatch.setenv(kernels_dispatch.MODE_ENV, "fast")
    with pytest.raises(ConfigError, match="must be one of"):
        linear(x, w)


LLAMA_SHAPES = [(4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]


@pytest.mark.parametrize("variant", [Variant(4, 128), Variant(8, 0), Variant(3, 128), Variant(2, 128),
                                     Variant(4, 32, tiled_rows=32), Variant(3, 128, tiled_rows=32)],
                         ids=lambda v: v.name)
def test_candidates_valid_for_llama_shapes(variant):
    """The autotuner proposes only runnable configs, for every 7B shape and batch (no compiling)."""
    for k, n in LLAMA_SHAPES:
        w = abstract_weight(k, n, variant)
        lay = autotune.kernel_layout(w)
        assert lay.problem() is None, (k, n, lay)
        for m in autotune.M_BUCKETS:
            cands = autotune.candidates(lay, m)
            assert cands or lay.rows < 16 and m > 8, (k, n, m)
            for cfg in cands:
                assert config_problem(cfg, lay, m) is None
            assert config_problem(default_config(lay, m), lay, m) is None


def test_tuning_table_lookup_and_measured_rule(tmp_path):
    w = abstract_weight(4096, 4096, Variant(4, 128))
    lay = autotune.kernel_layout(w)
    p1 = autotune.problem_of(w, 1)
    p64 = autotune.problem_of(w, 50)
    assert p64.m == 64
    fast = autotune.Entry(p1, GEMV(bn=64, split=4, step=4), kernel_us=5.0, xla_us=20.0)
    slow = autotune.Entry(p64, GEMM(bn=128, bm=64), kernel_us=30.0, xla_us=25.0)
    tab = autotune.TuningTable([fast, slow], {"card": "test"})
    tab.save(tmp_path / "t.json")
    tab = autotune.TuningTable.load(tmp_path / "t.json")
    assert tab.lookup(p1, lay, 1).config == fast.config and tab.lookup(p1, lay, 1).use_kernel
    assert not tab.lookup(p64, lay, 50).use_kernel  # the XLA path measured faster
    # Another shape of the same family borrows the nearest entry whose blocks fit it.
    w2 = abstract_weight(4096, 11008, Variant(4, 128))
    lay2 = autotune.kernel_layout(w2)
    got = tab.lookup(autotune.problem_of(w2, 1), lay2, 1)
    assert got is not None and got.config == fast.config
    # An asymmetric grid borrows the symmetric one's blocks; a different bit width has no entry.
    w_asym = abstract_weight(4096, 4096, Variant(4, 128, "asym"))
    assert tab.lookup(autotune.problem_of(w_asym, 1), lay, 1).config == fast.config
    w3 = abstract_weight(4096, 4096, Variant(8, 0))
    assert tab.lookup(autotune.problem_of(w3, 1), autotune.kernel_layout(w3), 1) is None


def test_table_from_records_ranks_by_device_time(tmp_path):
    """`bench_kernels.py --retable`: each point's entry is its candidate fastest on the device
    (CUPTI), not on the host-bound wall clock; failed candidates and invalid points are skipped,
    an untuned point keeps its config, and the problem matches the one `linear()` looks up."""
    import json

    bench = load_script("scripts/bench_kernels.py")
    a, b, c = GEMV(bn=64, split=4, dq="h2", acc2d=True), GEMV(bn=64, split=9, dq="inplace", acc2d=True), GEMV(bn=128)
    point = {"kind": "a16", "bits": 4, "group_size": 128, "grid": "asym", "layout": "native", "rows": 16,
             "k": 11008, "n": 4096, "m": 1, "config": b.to_json(), "kernel_us": 17.9,
             "candidates": [{"config": a.to_json(), "wall_us": 27.3, "device_us": 14.7},
                            {"config": b.to_json(), "wall_us": 27.2, "device_us": 18.0},
                            {"config": c.to_json(), "error": "lowering failed"}]}
    untuned = {**point, "m": 2, "candidates": [], "config": c.to_json(), "kernel_us": 20.0, "xla_dequant_us": 90.0}
    per_channel = {**untuned, "bits": 8, "group_size": 11008, "grid": "sym", "m": 1}
    invalid = {**point, "n": 1024, "invalid": ["xla_bf16: below the floor"]}
    records = tmp_path / "records.json"
    records.write_text(json.dumps([point, untuned, per_channel, invalid]))
    into = tmp_path / "table.json"
    assert bench.main(["--retable", str(records), "--into", str(into), "--note", "test"]) == 0
    tab = autotune.TuningTable.load(into)
    assert len(tab.entries) == 3 and tab.meta["note"] == "test"
    w = abstract_weight(11008, 4096, Variant(4, 128, "asym"))
    lay = autotune.kernel_layout(w)
    got = tab.entries[autotune.problem_of(w, 1, lay=lay)]
    assert got.config == a and got.kernel_us == 14.7 and got.use_kernel
    got2 = tab.entries[autotune.problem_of(w, 2, lay=lay)]
    assert got2.config == c and got2.kernel_us == 20.0 and got2.xla_us == 90.0
    w8 = abstract_weight(11008, 4096, Variant(8, 0))
    assert autotune.problem_of(w8, 1) in tab.entries
    with pytest.raises(UserError, match="expected a list of benchmark records"):
        bench.main(["--retable", str(into), "--into", str(tmp_path / "other.json")])


def test_grid_values_at_matches_dequantize():
    """The grid value of single elements (what the outlier correction subtracts), 3-bit codes."""
    q = random_qarray(5, 96, 48, Variant(3, 32, "asym"))
    idx = jnp.asarray([0, 47, 48, 95 * 48 + 47, 1234], jnp.int32)
    want = np.asarray(jax.jit(QArray.dequantize_storage_order)(q)).reshape(-1)[np.asarray(idx)]
    np.testing.assert_array_equal(np.asarray(jax.jit(grid_values_at)(q, idx)), want)
    t = repack_for_gpu(q, rows=16)
    np.testing.assert_array_equal(np.asarray(jax.jit(grid_values_at)(t, idx)), want)


def test_tile_config_json_round_trip():
    cfg = GEMM(bn=64, bm=32, split=2, step=2)
    assert TileConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(Exception, match="unknown keys"):
        TileConfig.from_json({**cfg.to_json(), "block_k": 64})
    assert dataclasses.replace(cfg, num_warps=8) != cfg


def test_timing_harness_keeps_calls_apart():
    """Each timed call has its own optimization barrier (XLA cannot merge calls that share a
    weight buffer), every call's output is returned, and a time below the bytes / bandwidth
    floor is flagged rather than reported."""
    from pallas_kernels.benchmark import FLOOR_SLACK, below_floor, spec_bandwidth

    xs = [random_activations(i, (1, 64)) for i in range(6)]
    ws = [jnp.ones((64, 32), jnp.bfloat16), 2 * jnp.ones((64, 32), jnp.bfloat16)]
    lowered = autotune.lower_calls(dense_linear, xs, ws)
    assert lowered.as_text().count("optimization_barrier") == len(xs)
    outs = lowered.compile()(xs, ws)
    assert len(outs) == len(xs)
    for i, (x, y) in enumerate(zip(xs, outs)):
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(dense_linear(x, ws[i % 2]), np.float32))
    assert below_floor(1.0, 25.0) and not below_floor(FLOOR_SLACK * 25.0, 25.0) and not below_floor(None, 1.0)
    # With the card's specified peak known, only beating the peak is impossible: run 9's XLA bf16
    # (4096 x 12288, 100.7 MB in 35.08 us = 2.87 TB/s, copy bandwidth 2.39 TB/s) is a measurement.
    peak = spec_bandwidth("NVIDIA H100 80GB HBM3")
    assert peak == 3.35e12 and spec_bandwidth("NVIDIA H200") == 4.8e12 and spec_bandwidth("Tesla T4") is None
    nbytes = 2 * 4096 * 12288 + 2 * (4096 + 12288)
    copy_floor, spec_floor = nbytes / 2.387e12 * 1e6, nbytes / peak * 1e6
    assert below_floor(35.08, copy_floor) and not below_floor(35.08, copy_floor, spec_floor)
    assert below_floor(0.9 * spec_floor, copy_floor, spec_floor)


@pytest.mark.parametrize("mult", [3e4, 1e-5])
def test_h2_holds_any_activation_range(mult):
    """dequant="h2" adds in fp16; the power-of-two scaling of x per program keeps activations of
    3e4 (fp16 sums would overflow) and 1e-5 (fp16 would flush them to subnormals) as accurate
    as the fp32 path."""
    w = random_weight(3, 1024, 64, Variant(4, 128))
    x = (random_activations(4, (2, 1024), jnp.float32) * mult).astype(jnp.bfloat16)
    ref = float64_reference(x, w)
    err = {dq: relative_error(quant_matmul(x, w, config=GEMV(m=2, split=2, dq=dq, acc2d=True), interpret=True), ref)
           for dq in ("fma", "h2")}
    assert err["h2"] <= 1.1 * err["fma"] and err["h2"] <= TOL, err


def test_bench_kernels_batches_option_restricts_a_suite():
    """`bench_kernels.py --batches 16` keeps the sym-batched suite's batch-16 sweep only."""
    bench = load_script("scripts/bench_kernels.py")
    sweeps = bench.only_batches(bench.suites("sym-batched"), {16})
    assert [(s.batches, s.tune_batches) for s in sweeps] == [((16,), (16,))]
    assert bench.only_batches(bench.suites("sym-batched"), {3}) == []


def test_bench_kernels_times_the_wgmma_kernel_on_fresh_buffers():
    """The "wgmma" suite times repacked W4 weights: every timing buffer gets its own random int4
    codes (a shared codes array would let the L2 serve the calls), the markdown names the kernel's
    config, and --retable leaves the wgmma records out of the Triton tuning table."""
    from pallas_kernels import wgmma_matmul as wm
    from pallas_kernels.benchmark import markdown

    bench = load_script("scripts/bench_kernels.py")
    assert {s.kind for s in bench.suites("wgmma")} == {"wgmma"}
    w = wm.repack_w4(random_weight(0, 256, 128, Variant(4, 128, "asym")), block_k=256)
    a, b = (autotune.random_like(w, jax.random.key(i)) for i in (1, 2))
    assert a.codes.dtype == jnp.int4 and a.codes.shape == w.codes.shape
    assert not np.array_equal(np.asarray(a.codes, np.int8), np.asarray(b.codes, np.int8))
    assert a.shape == w.shape and a.block_k == w.block_k
    # 8-bit codes too (int8: before, every buffer shared one codes array, which the L2 could serve)
    assert {(s.variant.bits, s.kind) for s in bench.suites("wgmma-w8w2")} == {(8, "wgmma"), (2, "wgmma")}
    w8 = wm.repack_w4(random_weight(0, 256, 128, Variant(8, 0)), block_k=256)
    a8, b8 = (autotune.random_like(w8, jax.random.key(i)) for i in (1, 2))
    assert a8.codes.dtype == jnp.int8 and a8.bits == 8 and a8.order == "paired"
    assert not np.array_equal(np.asarray(a8.codes), np.asarray(b8.codes))
    # 3-bit codes: both planes fresh (the high plane is a leaf of its own)
    assert {(s.variant.bits, s.kind) for s in bench.suites("wgmma-w3")} == {(3, "wgmma")}
    w3 = wm.repack_w4(random_weight(0, 256, 128, Variant(3, 128)), block_k=256)
    a3, b3 = (autotune.random_like(w3, jax.random.key(i)) for i in (1, 2))
    assert a3.high.dtype == jnp.int4 and a3.high.shape == w3.high.shape == (2, 1, 64, 64)
    assert not np.array_equal(np.asarray(a3.high, np.int8), np.asarray(b3.high, np.int8))
    cfg = {**dataclasses.asdict(wm.gemm_config(w, 256)), "block_k": 256, "stored_k": 0}
    rec = {"variant": "w4_g128_asym-wgmma", "kind": "wgmma", "bits": 4, "group_size": 128, "grid": "asym",
           "layout": "wgmma-bk256", "m": 256, "k": 256, "n": 128, "config": cfg, "kernel_us": 10.0,
           "xla_bf16_us": 12.0, "speedup": 1.2, "roofline_fraction": 0.5, "bandwidth_GBps": 100.0, "rel_err": 3e-3}
    assert f"| w4_g128_asym-wgmma | 256 | 128 | 256 | 10.0 | 12.0 | 1.20x | 50% | 100 | 10.0 / 12.0 | 3.0e-03 | " \
           f"wgmma tn{cfg['tile_n']} tk128 s{cfg['splits']} st{cfg['stages']} m{cfg['tile_m']} ws |" in markdown([rec], {})
    assert bench.table_from_records([rec]).entries == {}
