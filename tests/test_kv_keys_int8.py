"""The int8 keys pass's prepass, register map and plain-JAX model (`pallas_kernels/kv_keys_int8.py`)
against float references: B's rounding stays inside its analytic bound, the model's scores and split
maxima have cw2's keys-pass contract, and attention through them stays close to the float reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_kernel import _store

from jaxcompress.kv.store import to_code_order
from pallas_kernels import decode_attention as da
from pallas_kernels import kv_keys_int8 as kk
from pallas_kernels import kv_values_wgmma as kvw

S = 2048  # four 512-token steps


def _keys(seed, b=2, heads=1, zero=True):
    rng = np.random.default_rng(seed)
    k = _store(rng, b, S, 2, 32, 32, 1, d=128, channel_words=True, zero=zero)
    q = jnp.asarray(rng.normal(size=(b, k.codes.shape[1], heads, 128)).astype(np.float32))
    return rng, k, q


def exact_scores(q, k, scale):
    """float64 q . k in log2 units, token order [B, K, heads, S], from the dequantized keys."""
    kd = np.asarray(k.dequantize(), np.float64)  # [B, K, S, D]
    return np.einsum("bkgd,bksd->bkgs", np.asarray(q, np.float64) * scale * kk.LOG2E, kd)


def test_gather_registers_are_the_fragment_bytes():
    """Eight prmt and a shift and an and a register: byte i of register 4b + s is token 4b + s of
    channel c + i, for every token of random words (what the kernel's s8 fragments must hold)."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2 ** 32, size=(4, 257), dtype=np.uint64).astype(np.uint32)
    regs = kk.gather_registers(words)
    for token in range(kk.SLOTS):
        for i in range(4):
            np.testing.assert_array_equal((regs[token] >> (8 * i)) & 0xFF, (words[i] >> (2 * token)) & 3)


@pytest.mark.parametrize("zero", [True, False])
def test_prepare_stays_inside_the_rounding_bound(zero):
    """alpha * sum code B + offset against float64 q . k for every token and query head: off by at most
    alpha / 2 * sum_d |code_d - 1.5| (B's rounding about the codes' mean; the offset takes the rest out
    exactly), with the variance of uniform rounding errors about that mean."""
    _, k, q = _keys(1, heads=3, zero=zero)
    scale = 128 ** -0.5
    b8, alpha, offset = kk.prepare(q, k, scale=scale)
    n = (kk.STEP_TOKENS // k.token_group) * 3
    assert b8.shape == (2, k.codes.shape[1], S // kk.STEP_TOKENS, kk.b_rows(3, 32), 128) and b8.dtype == jnp.int8
    assert not np.asarray(b8[..., n:, :]).any() and np.all(np.asarray(alpha[..., n:]) == 1.0)
    assert int(np.abs(np.asarray(b8, np.int32)).max()) == kk.B_MAX
    codes = np.asarray(k.token_codes(), np.float64).reshape(2, -1, S // kk.STEP_TOKENS, kk.STEP_TOKENS, 128)
    b8, alpha, offset = (np.asarray(x, np.float64) for x in (b8, alpha, offset))
    row = (np.arange(kk.STEP_TOKENS) // 32)[:, None] * 3 + np.arange(3)  # [512, heads]
    sums = np.einsum("bkstd,bksnd->bkstn", codes, b8)
    got = np.take_along_axis(sums, np.broadcast_to(row, sums.shape[:3] + row.shape), -1) * alpha[..., row] + offset[..., row]
    want = exact_scores(q, k, scale)
    tokens = lambda x: np.moveaxis(x.reshape(2, -1, S, 3), -1, -2)  # noqa: E731  [b, k, steps, 512, heads] -> [b, k, heads, S]
    a = tokens(alpha[..., row])
    bound = a / 2 * tokens(np.broadcast_to(np.abs(codes - 1.5).sum(-1, keepdims=True), alpha[..., row].shape))
    err = np.abs(tokens(got) - want)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-4), float((err / bound).max())
    # uniform rounding errors about the codes' mean: variance alpha^2 sum_d (code_d - 1.5)^2 / 12 (about the
    # codes themselves it would be 2.8x larger)
    spread = tokens(np.broadcast_to(((codes - 1.5) ** 2).sum(-1, keepdims=True) / 12, alpha[..., row].shape))
    assert np.mean((err / a) ** 2) < 1.2 * np.mean(spread), (np.mean((err / a) ** 2), np.mean(spread))


def test_emulated_scores_have_the_keys_pass_contract():
    """emulate_scores: the prepass's scores in code order with the mask's bias, and each split's maximum
    over the blocks it reads (a length inside the last block, 2 splits of 1024-token blocks)."""
    rng, k, q = _keys(2, heads=2)
    scale, block, length = 128 ** -0.5, 1024, 1900
    mask = jnp.asarray(rng.random((2, S)) < 0.9)
    _, _, bias = da._cw_inputs(q, k, mask, length, scale, centred=True)
    scores, top = kk.emulate_scores(q, k, bias, length, scale=scale, block=block, blocks_per_split=1, n_splits=2)
    assert scores.shape == (2, k.codes.shape[1], 2, S) and top.shape == (2, k.codes.shape[1], 2, 2)
    want = to_code_order(jnp.asarray(exact_scores(q, k, scale), jnp.float32), 2, k.rows) + bias[:, None, None, :]
    valid = np.asarray(bias) == 0
    got, want = np.asarray(scores), np.asarray(want)
    np.testing.assert_allclose(got[:, :, :, valid[0]][0], want[:, :, :, valid[0]][0], atol=0.5)
    assert np.all(got[:, :, :, ~valid[0]][0] < -1e29)
    token = np.asarray(to_code_order(jnp.arange(S), 2, k.rows))
    for x in range(2):
        read = (token // block == x) & (token < -(-length // block) * block)
        np.testing.assert_allclose(np.asarray(top)[:, :, x], got[:, :, :, read].max(-1), rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_through_int8_scores_stays_close(heads):
    """The model's scores through the tensor-core values pass's model (`emulate_values`) against the float
    reference: within 1e-3, below a bf16 output's rounding (the GPU kernels measure 1.7-2.6e-3, kv_notes
    run 22), where exact scores through the same values pass are within 1e-4."""
    rng, k, q = _keys(3, heads=heads)
    v = _store(rng, 2, S, 2, 32, 1, 32, d=128, channel_words=True)
    scale, block, length = 128 ** -0.5, 1024, 2000
    mask = jnp.asarray(rng.random((2, S)) < 0.9)
    _, _, bias = da._cw_inputs(q, k, mask, length, scale, centred=True)
    want = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=scale)])

    def attend(scores, top):
        o, l, m = kvw.emulate_values(scores, top, length, v, heads=heads, block=block, blocks_per_split=1)
        return da.combine([da._split_partials(o, l, m, heads)])

    got = attend(*kk.emulate_scores(q, k, bias, length, scale=scale, block=block, blocks_per_split=1, n_splits=2))
    exact = to_code_order(jnp.asarray(exact_scores(q, k, scale), jnp.float32), 2, k.rows) + bias[:, None, None, :]
    token = to_code_order(jnp.arange(S), 2, k.rows)
    read = (token // block)[None, :] == jnp.arange(2)[:, None]
    top = jnp.max(jnp.where(read[None, None, :, None, :], exact[:, :, None], da.NEG_INF), -1)
    base = attend(exact, top)
    err = lambda x: float(jnp.linalg.norm(x - want) / jnp.linalg.norm(want))  # noqa: E731
    assert err(base) < 1e-4 and err(got) < 1e-3, (err(got), err(base))


def test_unsupported_stores_are_named():
    rng = np.random.default_rng(4)
    k4 = _store(rng, 1, S, 4, 32, 32, 1, d=128, channel_words=True)
    assert "2-bit channel_words" in kk.supports(k4, 1)
    k64 = _store(rng, 1, S, 2, 32, 32, 1, d=64, channel_words=True)
    assert "head_dim 64" in kk.supports(k64, 1)
    with pytest.raises(Exception, match="int8 keys pass cannot read this key store: .*head_dim 64"):
        kk.prepare(jnp.ones((1, k64.codes.shape[1], 1, 64)), k64, scale=0.1)


def test_kernel_fragment_holds_each_token_at_its_channel_row():
    """The kernel's thread map (`emulate_fragment`: each thread's word column, K positions' channel rows,
    prmt bytes and fragment rows) puts token (slot 2 tau + e, column 8 w + lane // 4) of the step at A's
    row 64 tau + 16 w + 8 e + lane // 4 and channel CHANNEL_ROWS[k] at K position k; and a warp's 32 loads
    of one register fall in 32 distinct banks of the 128-byte-swizzled words (why CHANNEL_ROWS)."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, size=(128, kk.STEP_TOKENS))  # [channel, token of the step]
    words = np.zeros((128, kk.STEP_COLUMNS), np.uint64)
    for slot in range(kk.SLOTS):
        words |= codes[:, slot::kk.SLOTS].astype(np.uint64) << (2 * slot)
    a = kk.emulate_fragment(words.astype(np.uint32))
    row = np.arange(kk.STEP_TOKENS)
    token = 16 * (8 * ((row % 64) // 16) + row % 8) + 2 * (row // 64) + (row // 8) % 2
    np.testing.assert_array_equal(a, codes[:, token].T[:, kk.CHANNEL_ROWS])
    assert sorted(kk.CHANNEL_ROWS) == list(range(128))
    for w in range(4):
        threads = [kk.fragment_rows(w, lane) for lane in range(32)]
        for load in range(32):  # register block load // 4, byte load % 4: one word of each lane
            banks = {((((j >> 2) ^ (rows[load] % 8)) << 2) | (j & 3)) % 32 for j, rows in threads}
            assert len(banks) == 32, (w, load)


def test_int8_keys_in_the_decode_path_match_the_float_reference():
    """`Cw2Config(keys="int8")` through `quantized_decode_partials` in interpret mode (the keys pass's
    plain-JAX model, then the f16x2 values pass): 1024 tokens in two blocks of 512, a length inside the
    second, two splits. Within 1e-3 of the float reference and several times the f16x2 keys pass's error
    (B's rounding shows: the int8 path ran). The kernel itself: tests/gpu/test_decode_attention_gpu.py."""
    s, length, scale = 1024, 900, 128 ** -0.5
    rng = np.random.default_rng(7)
    k = _store(rng, 2, s, 2, 32, 32, 1, d=128, channel_words=True)
    v = _store(rng, 2, s, 2, 32, 1, 32, d=128, channel_words=True)
    q = jnp.asarray(rng.normal(size=(2, k.codes.shape[1], 1, 128)).astype(np.float32))
    mask = jnp.asarray(rng.random((2, s)) < 0.9)
    want = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=scale)])
    run = lambda keys: da.combine([da.quantized_decode_partials(  # noqa: E731
        q, k, v, mask, length, scale=scale, path="cw2", interpret=True, num_splits=2,
        cw2=da.Cw2Config(keys=keys, columns=32))])
    err = lambda x: float(jnp.linalg.norm(x - want) / jnp.linalg.norm(want))  # noqa: E731
    got, cuda = err(run("int8")), err(run("cuda"))
    assert 3 * cuda < got < 1e-3, (got, cuda)


def test_int8_keys_lower_for_cuda_beside_the_wgmma_values_pass():
    """The keys pass traces and lowers for CUDA (no GPU needed): with the tensor-core values pass, the
    codec's decode is the Triton prepass and two Mosaic GPU kernels, and no f16x2 pass."""
    import jax
    from jax import export

    rng = np.random.default_rng(8)
    k = _store(rng, 1, 4096, 2, 32, 32, 1, d=128, channel_words=True)
    v = _store(rng, 1, 4096, 2, 32, 1, 32, d=128, channel_words=True)
    fn = jax.jit(lambda q, k, v, m: da.quantized_decode_partials(q, k, v, m, 3001, scale=0.1, path="cw2",
                                                                 cw2=da.Cw2Config(keys="int8", values="wgmma")))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=["cuda"], disabled_checks=checks)(
        jnp.zeros((1, k.codes.shape[1], 1, 128), jnp.bfloat16), k, v, jnp.ones((1, 4096), bool)).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1 and "kv_keys_int8_prepass" in text
    assert "kv_decode_k2_scores" not in text


@pytest.mark.parametrize("heads,zero,s", [(1, True, 2048), (2, False, 1024)], ids=["1q-zero", "2q-symmetric"])
def test_prepass_kernel_equals_prepare(heads, zero, s):
    """The Triton prepass (interpret mode) computes `prepare`'s B, alpha and offset: B's columns in
    CHANNEL_ROWS order (the tensor-core permutation is exact), B and alpha bit for bit, the offset up
    to the order of its fp32 sums; 4 steps a program (2048 tokens) and 2 (1024)."""
    rng = np.random.default_rng(10 + heads)
    k = _store(rng, 2, s, 2, 32, 32, 1, d=128, channel_words=True, zero=zero)
    q = jnp.asarray(rng.normal(size=(2, k.codes.shape[1], heads, 128)).astype(np.float32))
    b8, ao = kk.prepass(q, k, scale=0.1, interpret=True)
    want_b, want_alpha, want_offset = kk.prepare(q, k, scale=0.1)
    np.testing.assert_array_equal(np.asarray(b8), np.asarray(want_b)[..., kk.CHANNEL_ROWS])
    got_b, got_alpha, got_offset = kk.from_prepass(b8, ao)
    np.testing.assert_array_equal(np.asarray(got_b), np.asarray(want_b))
    np.testing.assert_array_equal(np.asarray(got_alpha), np.asarray(want_alpha))
    np.testing.assert_allclose(np.asarray(got_offset), np.asarray(want_offset), rtol=1e-5, atol=1e-5)


def test_kernel_limits_are_named():
    rng = np.random.default_rng(9)
    k = _store(rng, 1, S, 2, 32, 32, 1, d=128, channel_words=True)
    assert kk.kernel_problem(k, 2) is None and kk.kernel_problem(k, 2, block=2048) is None
    assert "exceed the kernel's 32 columns" in kk.kernel_problem(k, 4)
    assert "not whole steps of 512" in kk.kernel_problem(k, 1, block=256)
    k64 = _store(rng, 1, S, 2, 32, 64, 1, d=128, channel_words=True)  # 8 key groups a step
    assert kk.kernel_problem(k64, 1) is None and "power of two query heads" in kk.kernel_problem(k64, 3)
    v = _store(rng, 1, S, 2, 32, 1, 32, d=128, channel_words=True)
    with pytest.raises(Exception, match=r"keys='int8'.*exceed the kernel's 32 columns.*use keys='cuda'"):
        da.quantized_decode_partials(jnp.ones((1, k.codes.shape[1], 4, 128)), k, v, jnp.ones((1, S), bool), 1000,
                                     scale=0.1, interpret=True, path="cw2", cw2=da.Cw2Config(keys="int8"))
    with pytest.raises(Exception, match="Cw2Config.keys='fp8' must be one of"):
        da.Cw2Config(keys="fp8")
