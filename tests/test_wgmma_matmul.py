"""The Hopper W4 kernel's layout, arithmetic, dispatch and model repack on the CPU.

The kernel itself needs an H100/H200 (tests/gpu/test_wgmma_matmul_gpu.py); here: the column
permutations against hand-derived values, the repack against `QArray.dequantize()` bit for bit,
the kernel's arithmetic (`emulate_w4`) against a float64 reference, `linear()` falling back where
the kernel cannot run, `repack_for_wgmma` on a real (tiny random Hugging Face) Llama, the errors,
and that every layout still lowers to a Mosaic GPU kernel for CUDA (catches API drift).
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from jaxcompress.errors import ConfigError
from jaxcompress.io.checkpoint import save_checkpoint
from jaxcompress.io.hf import load_hf_folder
from jaxcompress.models.build import params, path_str, with_params
from jaxcompress.models.fuse import fuse_projections
from jaxcompress.models.repack import repack_for_wgmma
from jaxcompress.ops.linear import linear
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.rtn import rtn_params
from pallas_kernels import wgmma_matmul as wm
from pallas_kernels.testing import Variant, float64_reference, random_activations, random_weight, relative_error


def test_chunk_permutations_match_the_fragment_layout():
    """Hand-derived: a thread (q = lane % 4) owns physical columns 8q .. 8q + 7 of a chunk and
    the wgmma fragment wants logical (8c + 2q, 8c + 2q + 1) in its register c."""
    lop3, prmt = wm.chunk_permutation("lop3"), wm.chunk_permutation("prmt")
    for perm in (lop3, prmt):
        assert sorted(perm) == list(range(32))
    # lop3: register c = nibbles (c, c + 4) of the thread's word
    assert list(lop3[:8]) == [0, 8, 16, 24, 1, 9, 17, 25]  # thread q = 0
    assert list(lop3[8:16]) == [2, 10, 18, 26, 3, 11, 19, 27]  # q = 1
    # prmt: register c = nibbles (2c, 2c + 1); swapping q and c is its own inverse
    assert list(prmt[:8]) == [0, 1, 8, 9, 16, 17, 24, 25]
    np.testing.assert_array_equal(prmt[prmt], np.arange(32))
    with pytest.raises(ConfigError, match="order='lut'"):
        wm.chunk_permutation("lut")


@pytest.mark.parametrize("grid", ["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128, 256, 0])
@pytest.mark.parametrize("order,block_k", [("lop3", 0), ("lop3", 128), ("lop3", 256), ("prmt", 0)])
def test_repack_dequantizes_bit_for_bit(grid, group, order, block_k):
    w = random_weight(0, 512, 192, Variant(4, group, grid))
    ww = wm.repack_w4(w, order=order, block_k=block_k)
    assert ww.codes.dtype == jnp.int4
    assert ww.codes.shape == ((3, 512 // block_k, 64, block_k) if block_k else (192, 512))
    np.testing.assert_array_equal(np.asarray(ww.dequantize(), np.float32), np.asarray(w.dequantize(), np.float32))
    assert (ww.zero is None) == (grid == "sym")
    groups = 1 if group == 0 else 512 // group
    assert ww.nbytes() == 512 * 192 // 2 + groups * 192 * (2 + (2 if grid == "asym" else 0))  # fp16 scales, zeros


@pytest.mark.parametrize("grid", ["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128, 0])
@pytest.mark.parametrize("block_k", [0, 256])
@pytest.mark.parametrize("order", ["paired", "natural"])
def test_w8_repack_dequantizes_bit_for_bit(grid, group, block_k, order):
    """8-bit codes: int8 code - 128, one byte a code, columns permuted within 16-column segments."""
    w = random_weight(5, 512, 192, Variant(8, group, grid))
    ww = wm.repack_w4(w, order=order, block_k=block_k)
    assert (ww.codes.dtype, ww.order, ww.bits, ww.mid) == (jnp.int8, order, 8, 128)
    assert ww.codes.shape == ((3, 512 // block_k, 64, block_k) if block_k else (192, 512))
    np.testing.assert_array_equal(np.asarray(ww.dequantize(), np.float32), np.asarray(w.dequantize(), np.float32))
    # the stored int8 is exactly code - 128 of W^T, in the segment's order (hand-checked positions)
    codes = np.asarray(w.unpacked_codes()).T - 128  # [N, K] logical
    stored = np.asarray(ww.codes).transpose(0, 2, 1, 3).reshape(192, 512) if block_k else np.asarray(ww.codes)
    if order == "natural":
        np.testing.assert_array_equal(stored, codes)
    else:  # thread 1 of a row owns physical bytes 8..11: logical (2, 3, 10, 11); thread 2 bytes 4..7
        np.testing.assert_array_equal(stored[:, 16 + 8:16 + 12], codes[:, [18, 19, 26, 27]])
        np.testing.assert_array_equal(stored[:, 4:8], codes[:, [4, 5, 12, 13]])
    groups = 1 if group == 0 else 512 // group
    assert ww.nbytes() == 512 * 192 + groups * 192 * (2 + (2 if grid == "asym" else 0))


@pytest.mark.parametrize("grid", ["sym", "asym"])
@pytest.mark.parametrize("group,block_k", [(128, 0), (128, 256), (256, 128), (0, 256)])
def test_w2_repack_dequantizes_bit_for_bit(grid, group, block_k):
    """2-bit codes: two an int4 element (the lower column in the low bits), permuted within 64-column
    chunks; the kernel's arithmetic (emulate_w4) within bf16 rounding of float64."""
    w = random_weight(11, 512, 192, Variant(2, group, grid))
    ww = wm.repack_w4(w, block_k=block_k)
    assert (ww.codes.dtype, ww.order, ww.bits, ww.mid) == (jnp.int4, "lop3", 2, 2)
    assert ww.codes.shape == ((3, 512 // block_k, 64, block_k // 2) if block_k else (192, 256))
    np.testing.assert_array_equal(np.asarray(ww.dequantize(), np.float32), np.asarray(w.dequantize(), np.float32))
    # thread q = 1's word: physical columns 16 .. 31 hold logical (2, 10, ..., 58) then (3, 11, ..., 59)
    codes = np.asarray(w.unpacked_codes()).T  # [N, K] in 0..3
    stored = np.asarray(ww.codes.astype(jnp.int8)).transpose(0, 2, 1, 3).reshape(192, 256) if block_k \
        else np.asarray(ww.codes.astype(jnp.int8))
    nibbles = stored[:, 8:16] & 15
    np.testing.assert_array_equal(nibbles & 3, codes[:, [2, 18, 34, 50, 3, 19, 35, 51]])  # slots 0, 2, ..., 14
    groups = 1 if group == 0 else 512 // group
    assert ww.nbytes() == 512 * 192 // 4 + groups * 192 * (2 + (2 if grid == "asym" else 0))
    x = random_activations(12, (5, 512))
    assert relative_error(wm.emulate_w4(x, ww), float64_reference(x, w)) < 4e-3


@pytest.mark.parametrize("grid", ["sym", "asym"])
@pytest.mark.parametrize("group,block_k", [(128, 0), (128, 256), (256, 128), (0, 256)])
def test_w3_repack_dequantizes_bit_for_bit(grid, group, block_k):
    """3-bit codes in two int4 planes (low two bits, third bits): 3/8 byte a code; the kernel's
    arithmetic (emulate_w4) within bf16 rounding of float64, and reading the planes as 2-bit codes
    (the third bits dropped) is off by far."""
    w = random_weight(13, 512, 192, Variant(3, group, grid))
    ww = wm.repack_w4(w, block_k=block_k)
    assert (ww.codes.dtype, ww.high.dtype, ww.order, ww.bits, ww.mid) == (jnp.int4, jnp.int4, "lop3", 3, 4)
    blocked = lambda per: (3, 512 // block_k, 64, block_k // per) if block_k else (192, 512 // per)  # noqa: E731
    assert (ww.codes.shape, ww.high.shape) == (blocked(2), blocked(4))
    np.testing.assert_array_equal(np.asarray(ww.dequantize(), np.float32), np.asarray(w.dequantize(), np.float32))
    groups = 1 if group == 0 else 512 // group
    assert ww.nbytes() == 512 * 192 * 3 // 8 + groups * 192 * (2 + (2 if grid == "asym" else 0))
    x = random_activations(14, (5, 512))
    ref = float64_reference(x, w)
    assert relative_error(wm.emulate_w4(x, ww), ref) < 4e-3
    two_bit = dataclasses.replace(ww, bits=2, high=None)
    assert relative_error(wm.emulate_w4(x, two_bit), ref) > 0.3


def test_w3_planes_make_the_kernels_words():
    """Hand-checked against the kernel's register arithmetic (`_convert_planes`), in numpy: thread q's
    32-bit registers of the two planes (elements 8q .. 8q + 7 of a 32-element chunk, element t at
    bits 4t) give chunk w's word (low >> 2 (w % 2) & 0x33333333) | (high shifted by 2 - w % 4 &
    0xCCCCCCCC), whose nibble t & 7 must be the code at physical column 8q + t of chunk w."""
    rng = np.random.default_rng(0)
    phys = rng.integers(0, 8, size=(3, 256))
    low, high = (np.asarray(p) for p in wm.split_planes(jnp.asarray(phys)))
    assert low.shape == (3, 128) and high.shape == (3, 64) and low.max() < 16 and high.max() < 16
    np.testing.assert_array_equal(np.asarray(wm.join_planes(jnp.asarray(low), jnp.asarray(high))), phys)
    register = lambda elems: sum(int(e) << (4 * t) for t, e in enumerate(elems))  # noqa: E731
    for row in range(3):
        for q in range(4):
            for w in range(8):  # chunks of 32 columns; a low register covers 2, a high one 4
                lo = register(low[row, 32 * (w // 2) + 8 * q:][:8]) >> (2 * (w % 2))
                j = w % 4
                hi = register(high[row, 32 * (w // 4) + 8 * q:][:8])
                hi = (hi << (2 - j) if j < 2 else hi >> (j - 2)) & 0xFFFFFFFF
                word = (lo & 0x33333333) | (hi & 0xCCCCCCCC)
                assert [(word >> (4 * t)) & 7 for t in range(8)] == list(phys[row, 32 * w + 8 * q:][:8])
    # a hand-made case: the code 5 (0b101) at physical column 8 + 3 of chunk 1 (thread 1, t = 3)
    one = np.zeros((1, 128), np.int64)
    one[0, 32 + 11] = 5
    lo1, hi1 = (np.asarray(p) for p in wm.split_planes(jnp.asarray(one)))
    assert lo1[0, 11] == 0b0100 and np.count_nonzero(lo1) == 1  # chunk 2l + 1: bits 2-3 of element 11
    assert hi1[0, 11] == 0b0010 and np.count_nonzero(hi1) == 1  # chunk 4h + 1: bit 1 of element 11


def test_splits_keep_groups_that_span_steps():
    """Groups of 256 in 128-column steps: a split may not start mid-group (an H200 run read the next
    group's scale a step early: relative error 0.42). K = 11008 = 43 groups takes 1 split, 4096 takes 4."""
    w = wm.repack_w4(random_weight(0, 11008, 256, Variant(2, 256, "asym")), block_k=128)
    assert wm.default_config(w, 1).splits == 1 and wm.split_counts(11008, 128, 256) == [1]
    with pytest.raises(ConfigError, match="splits=2: K=11008 in slices of 5504 columns starts a slice inside a group of 256"):
        wm.check_config(wm.W4Config(64, 128, 2, 4), w, 8)
    assert wm.split_counts(4096, 128, 256) == [1, 2, 4, 8, 16]
    assert wm.split_counts(11008, 128, 11008) == [1, 2]  # per channel: one group, any split
    assert wm.split_counts(11008, 128, 128) == [1, 2]


def test_crumb_permutation_matches_the_fragment_layout():
    """Hand-derived: thread q's word holds physical columns 16q .. 16q + 15 (slot i at bits 2i); the
    fragment's register c = slots (c, c + 8) must be logical (8c + 2q, 8c + 2q + 1)."""
    perm = wm.crumb_permutation()
    assert sorted(perm) == list(range(64))
    assert list(perm[:16]) == [0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57]  # q = 0
    assert list(perm[16:20]) == [2, 10, 18, 26]  # q = 1
    with pytest.raises(ConfigError, match="group_size=64 with 2-bit codes"):
        wm.repack_w4(random_weight(0, 512, 64, Variant(2, 64, "sym")))


def test_byte_permutation_matches_the_fragment_layout():
    """Hand-derived: UPCAST_2X hands thread q the bytes 4b .. 4b + 3, b = (0, 2, 1, 3)[q]; the
    fragment wants (2q, 2q + 1) and (8 + 2q, 9 + 2q) there."""
    perm = wm.byte_permutation("paired")
    assert list(perm) == [0, 1, 8, 9, 4, 5, 12, 13, 2, 3, 10, 11, 6, 7, 14, 15]
    assert list(wm.byte_permutation("natural")) == list(range(16))
    with pytest.raises(ConfigError, match="order='lop3'"):
        wm.byte_permutation("lop3")
    with pytest.raises(ConfigError, match=r"order='lop3' for 8-bit codes; choose one of \('paired', 'natural'\)"):
        wm.repack_w4(random_weight(0, 256, 64, Variant(8, 0, "sym")), order="lop3")


@pytest.mark.parametrize("grid", ["sym", "asym"])
def test_w8_kernel_arithmetic_matches_float64(grid):
    """emulate_w4 on 8-bit codes: |code - zero| up to 255 is exact in bf16, so the error is bf16
    rounding of x and the output; reading the codes as 4-bit (wrong bits) is off by O(1)."""
    w = random_weight(9, 1024, 256, Variant(8, 0, grid))
    x = random_activations(10, (5, 1024))
    ref = float64_reference(x, w)
    for order in wm.ORDERS_8:
        ww = wm.repack_w4(w, block_k=256, order=order)
        assert relative_error(wm.emulate_w4(x, ww), ref) < 4e-3
    assert relative_error(wm.emulate_w4(x, dataclasses.replace(ww, order="paired")), ref) > 0.3  # wrong order
    assert relative_error(wm.emulate_w4(x, dataclasses.replace(ww, bits=4, order="prmt")), ref) > 0.3
    with pytest.raises(ConfigError, match="offset_on_acc .* lop3 order .* 'natural'"):
        wm.check_config(wm.W4Config(offset_on_acc=True), ww, 8)


@pytest.mark.parametrize("grid", ["sym", "asym"])
def test_kernel_arithmetic_matches_float64(grid):
    """emulate_w4 does what the kernel does (bf16 x, code - zero exact in bf16, per-group fp32 sums
    times the scale): within bf16 output rounding of the float64 product, and a wrong column
    order would be off by O(1)."""
    w = random_weight(1, 1024, 256, Variant(4, 128, grid))
    x = random_activations(2, (5, 1024))
    ref = float64_reference(x, w)
    for order in wm.ORDERS:
        ww = wm.repack_w4(w, order=order, block_k=256)
        assert relative_error(wm.emulate_w4(x, ww), ref) < 4e-3
    shuffled = wm.W4Weight(codes=ww.codes, scale=ww.scale, zero=ww.zero, group_size=128, shape=ww.shape,
                           order="lop3", block_k=256)  # prmt codes read in lop3 order
    assert relative_error(wm.emulate_w4(x, shuffled), ref) > 0.3


@pytest.mark.parametrize("grid,dtype", [("sym", jnp.bfloat16), ("asym", jnp.bfloat16), ("asym", jnp.float16)])
def test_offset_on_acc_arithmetic(grid, dtype):
    """W4Config.offset_on_acc: sums of (base + code) x in fp32, less (base + zero) times the
    group's sum of x, give the same product as (code - zero) x to fp32 cancellation (base 128 in
    bf16, 1024 in fp16); the wrong offset (base + 8 for an asymmetric grid) is off by far."""
    w = random_weight(7, 1024, 256, Variant(4, 128, grid))
    x = random_activations(8, (5, 1024), dtype)
    ww = wm.repack_w4(w, block_k=256)
    ref = float64_reference(x, w)
    plain, folded = wm.emulate_w4(x, ww), wm.emulate_w4(x, ww, offset_on_acc=True)
    assert relative_error(folded, ref) < 4e-3
    assert relative_error(folded, np.asarray(plain, np.float64)) < 2e-3  # output rounding apart
    if grid == "asym":
        as_sym = dataclasses.replace(ww, zero=jnp.full_like(ww.zero, 8))
        assert relative_error(wm.emulate_w4(x, as_sym, offset_on_acc=True), ref) > 0.05
    with pytest.raises(ConfigError, match="offset_on_acc .* lop3 order"):
        wm.check_config(wm.W4Config(offset_on_acc=True), wm.repack_w4(w, order="prmt"), 8)


def test_linear_falls_back_off_hopper(monkeypatch):
    w = random_weight(3, 256, 128, Variant(4, 128, "asym"))
    ww = wm.repack_w4(w)
    x = random_activations(4, (2, 3, 256))
    assert wm.kernel_problem(x, ww) == "the default device is not a Hopper GPU (wgmma needs compute capability 9.x)"
    y = linear(x, ww)
    assert y.shape == (2, 3, 128) and y.dtype == x.dtype
    assert relative_error(y.reshape(6, 128), float64_reference(x.reshape(6, 256), w)) < 1e-2
    monkeypatch.setenv("JAXCOMPRESS_QUANT_KERNEL", "kernel")
    with pytest.raises(ConfigError, match=r"cannot run weight \(256, 128\): the default device is not a Hopper"):
        linear(x, ww)
    assert "activations are float32" in wm.kernel_problem(x.astype(jnp.float32), ww)


def test_bad_weights_and_configs_are_named():
    with pytest.raises(ConfigError, match=r"bits=5 \(the wgmma kernel reads 2-, 3-, 4- and 8-bit codes\)"):
        wm.repack_w4(random_weight(0, 256, 64, Variant(5, 128, "sym")))
    with pytest.raises(ConfigError, match="group_size=64 with 3-bit codes"):
        wm.repack_w4(random_weight(0, 256, 64, Variant(3, 64, "sym")))
    for group in (16, 96):
        with pytest.raises(ConfigError, match=f"group_size={group}"):
            wm.repack_w4(random_weight(0, 384, 64, Variant(4, group, "sym")))
    asym = random_weight(0, 256, 64, Variant(4, 128, "asym"))
    with pytest.raises(ConfigError, match="zero points that are not integers"):
        wm.repack_w4(dataclasses.replace(asym, zero=asym.zero + 0.5))
    with pytest.raises(ConfigError, match="N=96 is not a multiple of 64"):
        wm.repack_w4(random_weight(0, 256, 96, Variant(4, 128, "sym")))
    with pytest.raises(ConfigError, match="block_k=384"):
        wm.repack_w4(random_weight(0, 512, 64, Variant(4, 128, "sym")), block_k=384)
    ww = wm.repack_w4(random_weight(0, 512, 128, Variant(4, 128, "sym")), block_k=256)
    with pytest.raises(ConfigError, match="tile_n=96"):
        wm.check_config(wm.W4Config(tile_n=96), ww, 8)
    with pytest.raises(ConfigError, match=r"K=512 is not a multiple of tile_k x splits = 256 x 3"):
        wm.check_config(wm.W4Config(tile_k=256, splits=3), ww, 8)
    with pytest.raises(ConfigError, match="activations"):
        wm.w4_matmul(jnp.zeros((1, 256), jnp.bfloat16), ww)
    wide = wm.repack_w4(random_weight(0, 512, 256, Variant(4, 128, "sym")))
    with pytest.raises(ConfigError, match="rows_per_wg=64 must be a multiple of 64 giving tile_n=256 to one or two"):
        wm.w4_matmul(jnp.zeros((1, 512), jnp.bfloat16), wide, wm.W4Config(256, 256, 1, 4, warp_specialized=True))
    with pytest.raises(ConfigError, match="tile_m=12 must be 0"):
        wm.check_config(wm.W4Config(tile_m=12), ww, 16)
    with pytest.raises(ConfigError, match="batch 264 > 256 rows .* tile the batch with W4Config.tile_m"):
        wm.check_config(wm.W4Config(), ww, 264)
    with pytest.raises(ConfigError, match="tile_n=128 on a weight blocked by 64 rows needs warp_specialized"):
        wm.check_config(wm.W4Config(128, 256, 1, 2), ww, 8)
    with pytest.raises(ConfigError, match="blocked by 64 x 256 needs tile_k dividing 256"):
        wm.check_config(wm.W4Config(64, 512, 1, 2), ww, 8)


def test_default_config_fills_the_gpu():
    """Run 16's rule: 64-row tiles, the fewest splits giving >= 200 programs, tile = block."""
    for (k, n), (block_k, splits) in {(4096, 4096): (256, 4), (4096, 14336): (256, 1),
                                      (11008, 4096): (128, 2), (14336, 4096): (256, 4),
                                      (4096, 1024): (256, 16)}.items():
        assert wm.choose_block_k(k, n) == block_k
        w = wm.W4Weight(codes=None, scale=None, zero=None, group_size=128, shape=(k, n), block_k=block_k)
        cfg = wm.default_config(w)
        assert (cfg.tile_n, cfg.tile_k, cfg.splits, cfg.stages) == (64, block_k, splits, 4)
        assert cfg.scale_on_acc and not cfg.warp_specialized


def test_default_config_fits_the_shared_memory_at_large_batches():
    """x tiles grow with the batch: at 128 rows a 256-column step holds 64 KB of x, so only two
    stages fit the 227 KB; an explicit config that does not fit is refused with its numbers
    (Mosaic GPU's own error names neither stages nor batch)."""
    w = wm.W4Weight(codes=None, scale=None, zero=None, group_size=128, shape=(4096, 4096), block_k=256)
    assert [wm.default_config(w, m).stages for m in (1, 32, 64)] == [4, 4, 4]
    # K = 4096 takes 4 splits, which XLA adds (a cluster of 4 measured slower)
    assert [wm.split_sum_of(wm.default_config(w, m)) for m in (1, 64)] == ["xla"] * 2
    decode_128 = wm.fit_stages(wm.W4Config(64, 256, 4, 4), w, 128)  # run 14's batch-128 config
    assert decode_128.stages == 2 and wm.split_sum_of(decode_128) == "xla"
    # 2 splits: a cluster, whose one received sum takes the shared memory of XLA's output tile
    w2 = dataclasses.replace(w, shape=(4096, 12288))
    assert [wm.split_sum_of(wm.default_config(w2, m)) for m in (1, 64)] == ["cluster"] * 2
    assert wm.smem_bytes(wm.fit_stages(wm.W4Config(64, 256, 2, 4), w2, 128), w2, 128) == 181248
    # 2 stages x (128 x 256 x 2 + 64 x 256 / 2 + 2 x 64 x 4) + 64 x 128 x 4 = 181,248 bytes
    assert wm.smem_bytes(decode_128, w, 128) == 181248
    # 4 x 74,240 + the cluster's 3 received sums of 64 x 128 x 4 bytes
    with pytest.raises(ConfigError, match=r"4 stages of tile_k=256 at batch 128 need 395264 bytes"):
        wm.check_config(wm.W4Config(64, 256, 4, 4, split_sum="cluster"), w, 128)
    shell = dataclasses.replace(w, zero=0)  # asymmetric: the zero points' table rides in every slot
    assert wm.smem_bytes(wm.W4Config(64, 256, 1, 1), shell, 8) == wm.smem_bytes(wm.W4Config(64, 256, 1, 1), w, 8) + 2 * 64 * 4


def test_gemm_config_tiles_large_batches():
    """Past DECODE_MAX_M rows: tiles of 128 weight rows on two compute warpgroups, 128-column steps,
    and the batch tile and split count that run 17's cost model ranks fastest, with 2 stages or more."""
    def shell(k, n):
        return wm.W4Weight(codes=None, scale=None, zero=None, group_size=128, shape=(k, n), block_k=256)

    expect = {  # (K, N, batch): (tile_m, splits, stages)
        (4096, 14336, 128): (128, 1, 4),  # 112 programs: one wave
        (4096, 14336, 256): (256, 1, 3),  # one wave of 256-row tiles beats two of 128
        (4096, 4096, 256): (128, 2, 4),  # 32 tiles of 128 x 128: K split for a wave of 128 programs
        (14336, 4096, 2048): (256, 1, 3),  # enough tiles: no split
        # 32 x 2 tiles of 256 rows, K split for a wave: 2 stages beside the sums' staging tile of 128
        # batch columns (run 18: 88-92 us on an H200, against 95.4 for 128-row tiles in run 17)
        (14336, 4096, 512): (256, 2, 2),
        (14336, 4096, 256): (256, 4, 2),
        (4096, 1024, 128): (128, 8, 4),
        (4096, 4096, 72): (72, 4, 4),  # the whole batch in one tile
        # 86 x 3 balanced tiles of 176 rows: 258 programs, just under two waves, against 344 of 128
        # rows (run 20 on an H200: 79.1 us at these 4 stages, 74.4 at 3, against 82.0-82.8)
        (4096, 11008, 512): (176, 1, 4),
    }
    for (k, n, m), want in expect.items():
        cfg = wm.default_config(shell(k, n), m)
        assert (cfg.tile_m, cfg.splits, cfg.stages) == want, (k, n, m, cfg)
        assert (cfg.tile_n, cfg.tile_k, cfg.rows_per_wg, cfg.warp_specialized, cfg.scale_on_acc) == (128, 128, 64, True, False)
        wm.check_config(cfg, shell(k, n), wm.padded_batch(m, cfg.tile_m))
    assert wm.default_config(shell(4096, 4096), wm.DECODE_MAX_M).tile_m == 0  # decode configs up to the limit
    # balanced tiles: 512 rows in 3, 5, 6 and 7 tiles, rounded up to 16 rows (4 tiles are 128 rows)
    assert wm.balanced_tiles(512) == [80, 96, 112, 176] and wm.balanced_tiles(384) == [80, 96, 192]
    assert wm.balanced_tiles(256) == []
    cfg = wm.gemm_config(shell(4096, 11008), 512, balanced=False)
    assert (cfg.tile_m, cfg.splits) == (128, 1)
    # the model: one wave of 112 programs of 32 steps at 128 rows, against two waves of 16-step
    # programs plus XLA's sum of 2 x 14336 x 128 fp32 partials, written and read
    assert wm.gemm_cost_us(4096, 14336, 128, 128, 1) == pytest.approx(32 * (0.34 + 0.00406 * 128) + 1.5)
    assert wm.gemm_cost_us(4096, 14336, 128, 128, 2) == pytest.approx(
        2 * (16 * (0.34 + 0.00406 * 128) + 1.5) + 2 * 14336 * 128 * 8 / 3.0e6)
    # slot: 256 x 128 x 2 (x) + 128 x 128 / 2 (codes) + 128 x 4 (scales); one split stores y itself
    cfg = wm.default_config(shell(4096, 14336), 256)
    assert wm.smem_bytes(cfg, shell(4096, 14336), 256) == 3 * (65536 + 8192 + 512)
    assert [wm.padded_batch(m, 128) for m in (1, 100, 128, 129, 300)] == [8, 104, 128, 256, 384]
    # split sums of a 256-row tile go through a staging tile in halves (`store_columns`): 64 KB, not 128
    cfg = wm.default_config(shell(14336, 4096), 512)
    assert wm.smem_bytes(cfg, shell(14336, 4096), 512) == 2 * (65536 + 8192 + 512) + 128 * 128 * 4
    assert [wm.store_columns(t) for t in (8, 128, 200, 256)] == [8, 128, 200, 128]  # halves stay multiples of 8


def test_padded_k_splits_llama2_down_projection():
    """K = 11008 is 43 steps of 256, which no small count divides: only 2 splits of 128-column
    steps (128 programs, one an SM; 17.5 us against the Triton GEMV's 14.1 on an H100, run 15).
    Stored padded to 11264 = 44 x 256 it splits 4 ways; K that already splits stays as it is."""
    assert wm.padded_k(11008, 4096) == 11264
    assert [wm.padded_k(k, n) for k, n in ((4096, 4096), (14336, 4096), (4096, 14336), (4096, 1024))] == [
        4096, 14336, 4096, 4096]
    q = random_weight(0, 11008, 64, Variant(4, 128, "asym"))
    w = wm.repack_w4(q, block_k=256, stored_k=wm.padded_k(11008, 4096))
    assert (w.k_stored, w.codes.shape, w.scale.shape, w.zero.shape) == (11264, (1, 44, 64, 256), (88, 64), (88, 64))
    np.testing.assert_array_equal(np.asarray(w.scale[86:]), 0)  # the padding contributes nothing
    shell = dataclasses.replace(w, shape=(11008, 4096))
    cfg = wm.default_config(shell, 1)
    assert (cfg.tile_k, cfg.splits) == (256, 4)
    # half a byte a code of the stored K; the scales and zero points of its groups
    assert w.nbytes() == 11264 * 64 // 2 + 2 * 88 * 64 * w.scale.dtype.itemsize


@pytest.mark.parametrize("grid,group,order,block_k", [("asym", 128, "lop3", 256), ("sym", 64, "prmt", 0),
                                                       ("asym", 32, "lop3", 0)])
def test_padded_weight_is_the_same_weight(grid, group, order, block_k):
    """Padding K with zero codes, scales and zero points changes the storage only: the dense
    weight is bit-identical to the unpadded repack's, the kernel's arithmetic (emulated) matches
    float64 as closely, and the kernel lowers with the last slice reaching past K."""
    q = random_weight(3, 1280, 128, Variant(4, group, grid))
    padded = wm.repack_w4(q, order=order, block_k=block_k, stored_k=1536)
    plain = wm.repack_w4(q, order=order)
    np.testing.assert_array_equal(np.asarray(padded.dequantize()), np.asarray(plain.dequantize()))
    np.testing.assert_array_equal(np.asarray(padded.centered_codes()), np.asarray(plain.centered_codes()))
    x = random_activations(4, (5, 1280))
    ref = float64_reference(x, q)
    assert relative_error(wm.emulate_w4(x, padded), ref) == pytest.approx(relative_error(wm.emulate_w4(x, plain), ref))
    assert relative_error(wm.emulate_w4(x, padded), ref) < 5e-3
    cfg = wm.W4Config(64, 256, 3, 2)  # 6 steps of the stored 1536 in 3 slices: the last one's 2nd step is padding
    text = jax.export.export(jax.jit(lambda x_, w_: wm.w4_matmul(x_, w_, cfg)), platforms=("cuda",))(
        jax.ShapeDtypeStruct((5, 1280), jnp.bfloat16), padded).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_repack_for_wgmma_pads_k_by_default():
    """repack_for_wgmma stores a down projection of Llama-2's K = 11008 (N = 3200: 50 tiles, so 4
    splits fill the GPU) padded to 11264 and blocked by 256 (faster on an H200, run 16);
    pad_k=False keeps K and steps by 128."""

    class Down(nnx.Module):
        def __init__(self, w):
            self.kernel = nnx.Param(w)

    model = Down(random_weight(0, 11008, 3200, Variant(4, 128, "asym")))
    padded = repack_for_wgmma(model)[0].kernel.get_value()
    plain = repack_for_wgmma(model, pad_k=False)[0].kernel.get_value()
    assert (padded.k_stored, padded.block_k, plain.k_stored, plain.block_k) == (11264, 256, 11008, 128)
    assert wm.stored_layout(11008, 3200) == (256, 11264)
    assert wm.stored_layout(11008, 3200, grouped=False) == wm.stored_layout(11008, 3200, pad_k=False) == (128, 11008)
    assert wm.stored_layout(4096, 14336) == (256, 4096)  # K that splits well stays as it is


def test_padding_is_refused_where_it_cannot_hold():
    q = random_weight(0, 1280, 64, Variant(4, 128, "sym"))
    with pytest.raises(ConfigError, match="stored_k=1024 must exceed K=1280"):
        wm.repack_w4(q, stored_k=1024)
    with pytest.raises(ConfigError, match="stored_k=1344 must exceed K=1280 by whole groups"):
        wm.repack_w4(q, stored_k=1344)
    with pytest.raises(ConfigError, match="grouped"):
        wm.repack_w4(random_weight(0, 1280, 64, Variant(4, 0, "sym")), stored_k=1536)
    with pytest.raises(ConfigError, match="block_k=1024 must be a multiple of 128 dividing K=1536"):
        wm.repack_w4(q, block_k=1024, stored_k=1536)


def test_split_sums_meet_in_a_cluster():
    """By default the splits of a tile form a thread-block cluster that adds their fp32 sums and
    stores y [M, N] itself, so the exported program is the kernel alone; split_sum="xla" keeps the
    partial sums' reduce and transpose beside it. The first program's shared memory holds the
    other splits' sums, and a cluster takes at most 8 programs."""
    import re

    w = wm.repack_w4(random_weight(0, 1024, 256, Variant(4, 128, "asym")), block_k=256)

    def hlo_ops(cfg, m):
        text = jax.export.export(jax.jit(lambda x, w_: wm.w4_matmul(x, w_, cfg)), platforms=("cuda",))(
            jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16), w).mlir_module()
        return set(re.findall(r"stablehlo\.([a-z_]+)", text))

    for m in (1, 8):
        assert hlo_ops(wm.W4Config(64, 256, 4, 4, split_sum="cluster"), m) == {"custom_call"}
        assert hlo_ops(wm.W4Config(64, 256, 2, 4), m) == {"custom_call"}
        assert hlo_ops(wm.W4Config(64, 256, 1, 4), m) == {"custom_call"}
        assert {"reduce", "transpose"} <= hlo_ops(wm.W4Config(64, 256, 2, 4, split_sum="xla"), m)
    assert not {"reduce", "transpose", "slice"} & hlo_ops(wm.W4Config(64, 256, 2, 4), 13)  # x's padding only
    assert [wm.split_sum_of(wm.W4Config(splits=s)) for s in (1, 2, 4, 16)] == ["cluster", "cluster", "xla", "xla"]
    assert wm.split_sum_of(wm.W4Config(splits=2, warp_specialized=True)) == "xla"
    # K = 2048 in 4 splits: 2 steps a slice, so 2 slots of (8 x 256 x 2 + 64 x 256 / 2 + 2 x 2 x 64 x 4),
    # and the (4 - 1) received sums of 64 x 8 x 4 bytes, or the one tile copied out for XLA
    shell = dataclasses.replace(w, shape=(2048, 256))
    assert wm.smem_bytes(wm.W4Config(64, 256, 4, 4, split_sum="cluster"), shell, 8) == 2 * (4096 + 8192 + 1024) + 3 * 2048
    assert wm.smem_bytes(wm.W4Config(64, 256, 4, 4, split_sum="xla"), shell, 8) == 2 * (4096 + 8192 + 1024) + 2048
    with pytest.raises(ConfigError, match="split_sum='cluster' takes at most 8 splits"):
        wm.check_config(wm.W4Config(64, 128, 16, 4, split_sum="cluster"), wm.repack_w4(
            random_weight(0, 2048, 64, Variant(4, 128, "sym"))), 8)
    # warp-specialized: each compute warpgroup sends its 64-row block, one kernel in the program
    ws = wm.W4Config(128, 128, 2, 2, scale_on_acc=False, warp_specialized=True, split_sum="cluster")
    assert hlo_ops(ws, 8) == {"custom_call", "reshape"}  # the reshape: the codes' view (`_stacks_blocks`), a bitcast
    with pytest.raises(ConfigError, match="split_sum='sum'"):
        wm.check_config(wm.W4Config(64, 256, 2, 4, split_sum="sum"), w, 8)


def test_call_sites_share_one_kernel_module():
    """A decode step calls the kernel once a projection a layer: calls of one shape must lower to
    one Mosaic GPU module (each distinct module is compiled on the GPU; 128 of them took minutes)."""
    ws = [wm.repack_w4(random_weight(i, 1024, 1024, Variant(4, 128, "asym")), block_k=256) for i in range(3)]

    def layers(x, ws):
        for w in ws:
            x = wm.w4_matmul(x, w)
        return x

    text = jax.export.export(jax.jit(layers), platforms=("cuda",))(
        jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), ws).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert text.count("call @w4_matmul") == 3


@pytest.mark.parametrize("order,block_k,scale_on_acc,m,grid,ws,group,overlap", [
    ("lop3", 256, True, 1, "asym", False, 128, False), ("prmt", 0, False, 13, "sym", False, 128, False),
    ("lop3", 128, True, 32, "asym", False, 128, False), ("lop3", 0, True, 3, "asym", True, 128, False),
    ("lop3", 256, False, 8, "asym", False, 32, False), ("prmt", 256, True, 2, "asym", False, 64, False),
    ("lop3", 128, False, 1, "asym", False, 128, True), ("lop3", 0, False, 16, "sym", False, 64, True),
    ("lop3", 256, True, 1, "asym", False, 128, "fold"), ("lop3", 0, True, 8, "sym", False, 64, "fold"),
    ("lop3", 0, True, 3, "asym", True, 128, "fold"),
    # large batches: tiles of the batch, 128-column steps of 256-column blocks, 2 blocks a warpgroup
    ("lop3", 256, False, 300, "asym", "gemm", 128, False), ("prmt", 0, False, 200, "sym", "gemm", 32, False)])
def test_kernel_lowers_for_cuda(order, block_k, scale_on_acc, m, grid, ws, group, overlap, bits=4):
    """The Mosaic GPU kernel traces and lowers for CUDA here (the GPU compiles and runs it), with
    the zero points inside: one kernel a call, no XLA dot beside it."""
    w = wm.repack_w4(random_weight(0, 1024, 256, Variant(bits, group, grid)), order=order, block_k=block_k)
    cfg = wm.W4Config(128 if ws else 64, block_k or 256, 2, 4, scale_on_acc=scale_on_acc, warp_specialized=ws,
                      overlap_mma=overlap is True, offset_on_acc=overlap == "fold")
    if ws == "gemm":  # 3-bit codes step whole 256-column blocks (`three_bit_step_problem`): 2 stages fit
        cfg = wm.W4Config(256, 256 if bits == 3 else 128, 1, 2 if bits == 3 else 3, scale_on_acc=False,
                          warp_specialized=True, tile_m=128, rows_per_wg=128)
    text = jax.export.export(jax.jit(lambda x, w_: wm.w4_matmul(x, w_, cfg)), platforms=("cuda",))(
        jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16), w).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "dot_general" not in text


@pytest.mark.parametrize("order,block_k,scale_on_acc,m,grid,ws,group", [
    ("paired", 256, True, 1, "sym", False, 0), ("natural", 256, True, 1, "sym", False, 0),
    ("paired", 256, True, 13, "asym", False, 128), ("paired", 0, False, 8, "asym", False, 32),
    ("natural", 256, True, 3, "sym", True, 0), ("paired", 256, False, 300, "asym", "gemm", 128)])
def test_w8_kernel_lowers_for_cuda(order, block_k, scale_on_acc, m, grid, ws, group):
    """8-bit codes: a 256-column group in two 128-byte pieces, groups of 32 sliced from one."""
    test_kernel_lowers_for_cuda(order, block_k, scale_on_acc, m, grid, ws, group, False, bits=8)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("block_k,scale_on_acc,m,grid,ws,group,overlap", [
    (256, True, 1, "sym", False, 0, False), (256, True, 8, "asym", False, 128, False),
    (0, True, 3, "sym", False, 128, False), (128, True, 1, "asym", False, 256, False),
    (256, False, 13, "asym", False, 128, False), (256, True, 2, "asym", False, 128, "fold"),
    (256, True, 4, "sym", True, 128, False), (256, False, 300, "asym", "gemm", 128, False)])
def test_w2_w3_kernel_lowers_for_cuda(block_k, scale_on_acc, m, grid, ws, group, overlap, bits):
    """2-bit codes: 256-column pieces of 64-byte rows (128 where the step is 128), eight pairs a word.
    3-bit codes: two planes, two TMA streams; 128-column pieces (a 128-column step) leave the high
    plane's 16-byte rows unswizzled."""
    test_kernel_lowers_for_cuda("lop3", block_k, scale_on_acc, m, grid, ws, group, overlap, bits=bits)


def lop3(a, b, c, table: int):
    """PTX lop3.b32 bit by bit: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of the table."""
    index = ((a[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 2 | \
            ((b[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 1 | ((c[..., None] >> np.arange(32, dtype=np.uint32)) & 1)
    return (((table >> index) & 1).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def test_lop3_truth_tables():
    """The conversion's PTX lop3 immediates compute what arith's and-or did: (word & mask) | magic, and
    the 3-bit planes' join (low & 0x33333333) | (high & 0xCCCCCCCC); the other table would be wrong."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**32, (2, 256), dtype=np.uint64).astype(np.uint32)
    mask, magic, join = np.uint32(0x000F000F), np.uint32(0x43004300), np.uint32(0x33333333)
    np.testing.assert_array_equal(lop3(a, np.full_like(a, mask), np.full_like(a, magic), wm.LOP3_AND_OR),
                                  (a & mask) | magic)
    np.testing.assert_array_equal(lop3(a, b, np.full_like(a, join), wm.LOP3_SELECT), (a & join) | (b & ~join))
    assert not np.array_equal(lop3(a, b, np.full_like(a, join), wm.LOP3_AND_OR), (a & join) | (b & ~join))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lop3_option_lowers_for_cuda(bits):
    """W4Config.lop3: by default (None) and with True the kernel lowers with the and-or (and the 3-bit
    join) as PTX lop3; False leaves them to arith. 8-bit codes and the prmt order have no such
    conversion: the default skips it there, True is refused."""
    w = wm.repack_w4(random_weight(0, 1024, 256, Variant(bits, 128, "asym")), order="lop3", block_k=256)

    def text(cfg):
        return jax.export.export(jax.jit(lambda x, w_: wm.w4_matmul(x, w_, cfg)), platforms=("cuda",))(
            jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), w).mlir_module()

    by_default = text(wm.W4Config(64, 256, 2, 4))
    assert by_default.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"{wm.LOP3_AND_OR:#x};" in by_default
    assert (f"{wm.LOP3_SELECT:#x};" in by_default) == (bits == 3)
    explicit = text(wm.W4Config(64, 256, 2, 4, lop3=True))
    assert [by_default.count(f"{t:#x};") for t in (wm.LOP3_AND_OR, wm.LOP3_SELECT)] == \
           [explicit.count(f"{t:#x};") for t in (wm.LOP3_AND_OR, wm.LOP3_SELECT)]
    assert "lop3.b32" not in text(wm.W4Config(64, 256, 2, 4, lop3=False))
    for other in (wm.repack_w4(random_weight(0, 1024, 256, Variant(8, 0)), block_k=256),
                  wm.repack_w4(random_weight(0, 1024, 256, Variant(4, 128)), order="prmt")):
        assert not wm.lop3_of(wm.W4Config(), other)
        with pytest.raises(ConfigError, match="W4Config.lop3 .* lop3 order"):
            wm.check_config(wm.W4Config(lop3=True), other, 8)


def test_w3_steps_keep_the_high_plane_whole():
    """3-bit codes: a 128-column step reads 16-byte rows of the high plane, unswizzled; on an H200 that was
    wrong where the step is part of a longer stored row (relative error 0.59 at batch 64 and 136 with
    128-column gemm steps of 256-column blocks), right on blocks of 128. So gemm steps are whole blocks
    of 256 there, and a config that would slice a row is refused."""
    shell = lambda block_k: wm.W4Weight(codes=None, scale=None, zero=None, group_size=128, shape=(4096, 4096),  # noqa: E731
                                        block_k=block_k, bits=3)
    cfg = wm.default_config(shell(256), 136)
    assert (cfg.tile_k, cfg.warp_specialized) == (256, True) and cfg.stages >= 2
    wm.check_config(cfg, shell(256), wm.padded_batch(136, cfg.tile_m))
    assert wm.default_config(shell(128), 136).tile_k == 128  # the whole stored row
    assert wm.default_config(dataclasses.replace(shell(256), bits=4), 136).tile_k == 128
    with pytest.raises(ConfigError, match="tile_k=128 with 3-bit codes stored in blocks of 256"):
        wm.check_config(wm.W4Config(64, 128, 1, 4), shell(256), 8)
    with pytest.raises(ConfigError, match="tile_k=128 with 3-bit codes stored unblocked"):
        wm.check_config(wm.W4Config(64, 128, 1, 4), shell(0), 8)


@pytest.fixture(scope="module")
def llama_w4(tmp_path_factory):
    """A tiny random Llama wide enough for 64-row tiles and 128-column groups, RTN W4 g128
    (asymmetric q/k/v, symmetric elsewhere), and one 5-bit projection that must stay a QArray."""
    hf = hf_models.build("llama", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    model, _ = load_hf_folder(hf_models.save(hf, tmp_path_factory.mktemp("wgmma")))
    state = params(model)
    names = [path_str(p) for p, _ in nnx.to_flat_state(state) if path_str(p).endswith("proj.kernel")]
    policy = {n: LayerConfig(bits=5 if n == "layers.1.mlp.down_proj.kernel" else 4, group_size=128,
                             symmetric=not any(t in n for t in ("q_proj", "k_proj", "v_proj")))
              for n in names}
    return with_params(model, rtn_params(state, policy))


def test_repack_for_wgmma_keeps_the_function(llama_w4, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_QUANT_KERNEL", "reference")
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 200, size=(2, 7)))
    expect = np.asarray(llama_w4(tokens)[0])
    fused, _ = fuse_projections(llama_w4)
    repacked, report = repack_for_wgmma(fused)
    assert len(report.repacked) == 2 * 4 - 1  # qkv, o, gate_up, down a layer, less the 5-bit down
    assert report.skipped == {"layers.1.mlp.down_proj.kernel": "bits=5 (the wgmma kernel reads 2-, 3-, 4- and 8-bit codes)"}
    assert "layers.0.self_attn.qkv_proj.kernel" in report.repacked
    assert isinstance(repacked.layers[0].self_attn.qkv_proj.kernel.get_value(), wm.W4Weight)
    assert not isinstance(fused.layers[0].self_attn.qkv_proj.kernel.get_value(), wm.W4Weight)  # input kept
    np.testing.assert_allclose(np.asarray(repacked(tokens)[0]), expect, rtol=1e-5, atol=1e-5)
    assert "repacked 7 weights" in report.summary()


@pytest.mark.parametrize("bits,group,symmetric,order,dtype", [(8, "channel", True, "paired", jnp.int8),
                                                               (3, 128, False, "lop3", jnp.int4)])
def test_repack_for_wgmma_takes_8_and_3_bit_weights(tmp_path, monkeypatch, bits, group, symmetric, order, dtype):
    """RTN W8 per channel and W3 g128 asymmetric: repacked (the function kept) unless `bits` leaves them out."""
    monkeypatch.setenv("JAXCOMPRESS_QUANT_KERNEL", "reference")
    hf = hf_models.build("llama", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    model, _ = load_hf_folder(hf_models.save(hf, tmp_path))
    state = params(model)
    policy = {path_str(p): LayerConfig(bits=bits, group_size=group, symmetric=symmetric)
              for p, _ in nnx.to_flat_state(state) if path_str(p).endswith("proj.kernel")}
    quantized = with_params(model, rtn_params(state, policy))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 200, size=(2, 5)))
    repacked, report = repack_for_wgmma(quantized)
    assert len(report.repacked) == 2 * 7 and not report.skipped
    leaf = repacked.layers[0].mlp.down_proj.kernel.get_value()
    assert (leaf.bits, leaf.order, leaf.codes.dtype) == (bits, order, dtype)
    assert (leaf.high is not None) == (bits == 3)
    np.testing.assert_allclose(np.asarray(repacked(tokens)[0]), np.asarray(quantized(tokens)[0]), rtol=1e-5, atol=1e-5)
    _, kept = repack_for_wgmma(quantized, bits=(4,))
    assert not kept.repacked
    assert kept.skipped["layers.0.mlp.down_proj.kernel"] == f"bits={bits} not asked for (bits=(4,))"
    # a repacked model saves and loads in a fresh process, which imports the leaf type's module itself
    save_checkpoint(repacked, str(tmp_path / "ckpt"))
    np.save(tmp_path / "expect.npy", np.asarray(leaf.dequantize(), np.float32))
    code = ("import sys, numpy as np; from jaxcompress.io.checkpoint import load_checkpoint; "
            "leaf = load_checkpoint(sys.argv[1])[0].layers[0].mlp.down_proj.kernel.get_value(); "
            "assert type(leaf).__name__ == 'W4Weight' and leaf.bits == int(sys.argv[3]), leaf; "
            "np.testing.assert_array_equal(np.asarray(leaf.dequantize(), np.float32), np.load(sys.argv[2])); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "expect.npy"), str(bits)],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_unmeasured_batched_qarray_points_at_the_repack(monkeypatch, caplog):
    """On a Hopper GPU (faked here), an 8-bit QArray at an unmeasured batch > 1 runs the default Triton
    config (0.22-0.49x bf16 measured) and says once that repack_for_wgmma runs it on the wgmma kernel."""
    import logging

    from jaxcompress.quant import kernels_dispatch as kd

    monkeypatch.setattr(kd, "compute_capability", lambda: 9.0)
    w = random_weight(0, 4096, 512, Variant(8, 0, "sym"))
    with caplog.at_level(logging.WARNING, logger=kd.__name__):
        assert kd.choose_config(jnp.zeros((1, 4096), jnp.bfloat16), w) is not None
        assert "repack_for_wgmma" not in caplog.text  # batch 1: the measured GEMV
        for _ in range(2):
            assert kd.choose_config(jnp.zeros((8, 4096), jnp.bfloat16), w) is not None
    assert caplog.text.count("8-bit weight (4096, 512) at batch 8 has no measured kernel config") == 1
    assert "repack_for_wgmma(model)" in caplog.text


def test_probe_script_configs():
    """scripts/gpu/wgmma_w4_probe.py: the flags of --configs and the default sweep (run 16's)."""
    from script_loader import load_script

    probe = load_script("scripts/gpu/wgmma_w4_probe.py")
    (a, order_a, block_a, pad_a), (b, order_b, block_b, pad_b), (c, _, block_c, pad_c) = probe.parse_configs(
        "64:256:2:4+loads+blocked,128:128:1:8+mul+prmt,64:256:4:4+pad+xla+ovl")
    assert (a.tile_n, a.tile_k, a.splits, a.stages, a.loads_only, a.scale_on_acc) == (64, 256, 2, 4, True, True)
    assert (order_a, block_a, order_b, block_b) == ("lop3", 256, "prmt", 0)
    assert (b.scale_on_acc, b.loads_only, pad_a, pad_b) == (False, False, False, False)
    assert (c.split_sum, block_c, pad_c) == ("xla", 256, True)  # padded K is stored blocked
    assert (a.overlap_mma, c.overlap_mma, c.scale_on_acc) == (False, True, False)
    [d] = probe.parse_configs("default+ovl")  # the shipped default at each point, padded K as repacked
    cfg, order, block_k, pad = probe.resolve_default(d, 11008, 4096, 1, "asym")
    assert (cfg.tile_k, cfg.splits, cfg.overlap_mma, cfg.scale_on_acc, block_k, pad) == (256, 4, True, False, 256, True)
    sweep = probe.candidate_configs(11008, 4096, 8, 128)
    assert [(c.tile_k, c.splits, c.stages, blk) for c, _, blk, _ in sweep] == [(128, 2, 4, 128), (128, 2, 8, 128)]
    big = probe.candidate_configs(4096, 4096, 128, 128, "asym")  # stages cut to what fits, the term inside
    assert [(c.splits, c.stages) for c, _, _, _ in big] == [(4, 2), (8, 2)]


def test_one_matmul_script_runs_both_paths(capsys):
    """scripts/gpu/one_matmul.py (the ncu driver) runs here through linear()'s fallback and reports
    the output's error against float64."""
    from script_loader import load_script

    one = load_script("scripts/gpu/one_matmul.py")
    for kernel in ("wgmma", "triton"):
        one.main(["--kernel", kernel, "--shape", "256x128", "--batch", "2", "--grid", "asym", "--calls", "1"])
        err = float(capsys.readouterr().out.split("relative error ")[1].split()[0])
        assert err < 1e-2


def test_probe_issue_records():
    """A hand-made probe point becomes two issue-format records (wgmma, triton) with the speedup
    over bf16 and the roofline against the H100's specified 3.35 TB/s."""
    from script_loader import load_script

    probe = load_script("scripts/gpu/wgmma_w4_probe.py")
    point = {"k": 4096, "n": 4096, "m": 8, "grid": "sym", "group_size": 128, "rel_err": 2e-3,
             "wgmma_us": 5.0, "wgmma_config": {"tile_n": 64}, "triton_us": 10.0, "triton_config": {"block_n": 128},
             "xla_bf16_us": 15.0, "weight_bytes": 3_350_000}
    recs = probe.issue_records({"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "commit": "abc", "records": [point]})
    assert [(r["kernel"], r["speedup"], round(r["roofline_fraction"], 6)) for r in recs] == [
        ("wgmma", 3.0, 0.2), ("triton", 1.5, 0.1)]
    for key in ("bits", "group_size", "m", "k", "n", "kernel_us", "xla_bf16_us", "speedup", "roofline_fraction"):
        assert key in recs[0]
    # an 8-bit point with both orders timed and the QArray's own path: --report-order keeps the default's
    cand = lambda order, us: {"config": {"order": order, "loads_only": False}, "us": us, "rel_err": 2e-3}  # noqa: E731
    w8 = {**point, "bits": 8, "group_size": 0, "wgmma_us": 4.0, "qarray_linear_us": 30.0,
          "candidates": [cand("paired", 6.0), cand("natural", 4.0), {**cand("paired", 1.0), "rel_err": None}]}
    recs = probe.issue_records({"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "commit": "abc", "records": [w8]},
                               order="paired")
    assert [(r["variant"], r["kernel_us"], r["speedup"]) for r in recs] == [
        ("w8_ch_sym wgmma", 6.0, 2.5), ("w8_ch_sym qarray", 30.0, 0.5)]


def test_repacked_model_checkpoint_roundtrip(llama_w4, tmp_path):
    """A model repacked for the kernel (unfused here: the checkpoint format stores the unfused
    tree) saves and restores through orbax bit for bit, int4 codes included."""
    from jaxcompress.io.checkpoint import load_checkpoint, save_checkpoint

    repacked, _ = repack_for_wgmma(llama_w4)
    save_checkpoint(repacked, str(tmp_path / "ckpt"))
    loaded, _, _ = load_checkpoint(str(tmp_path / "ckpt"))
    for name in ("q_proj", "k_proj"):
        a = getattr(repacked.layers[0].self_attn, name).kernel.get_value()
        b = getattr(loaded.layers[0].self_attn, name).kernel.get_value()
        assert isinstance(b, wm.W4Weight) and b.codes.dtype == jnp.int4 and (b.order, b.block_k) == (a.order, a.block_k)
        np.testing.assert_array_equal(np.asarray(b.codes.astype(jnp.int8)), np.asarray(a.codes.astype(jnp.int8)))
        np.testing.assert_array_equal(np.asarray(b.zero), np.asarray(a.zero))
    tokens = jnp.asarray([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(np.asarray(loaded(tokens)[0]), np.asarray(repacked(tokens)[0]))


def test_fp16_activations_stay_fp16_with_the_lop3_order():
    """fp16 x: the lop3 order converts codes to fp16 (magic 0x6400, exact) and multiplies in fp16,
    so the result is as close to float64 as fp16 rounding allows; the prmt order (Mosaic's bf16
    conversion) multiplies in bf16, about 6x further off."""
    w = random_weight(1, 1024, 256, Variant(4, 128, "asym"))
    x = random_activations(2, (5, 1024), jnp.float16)
    ref = float64_reference(x, w)
    lop3, prmt = wm.repack_w4(w, order="lop3"), wm.repack_w4(w, order="prmt")
    assert (wm.compute_dtype(x.dtype, lop3), wm.compute_dtype(x.dtype, prmt)) == ("float16", "bfloat16")
    assert relative_error(wm.emulate_w4(x, lop3), ref) < 5e-4
    assert 5e-4 < relative_error(wm.emulate_w4(x, prmt), ref) < 4e-3
    text = jax.export.export(jax.jit(lambda x_, w_: wm.w4_matmul(x_, w_, wm.W4Config(64, 256, 2, 4))),
                             platforms=("cuda",))(jax.ShapeDtypeStruct((3, 1024), jnp.float16), lop3).mlir_module()
    assert "mosaic_gpu" in text
