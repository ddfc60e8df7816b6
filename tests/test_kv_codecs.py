"""KV codecs: round trips against float64 numpy, KIVI's residual window at group boundaries,
KVQuant's pre-RoPE algebra, exact outliers and sink, the kernel path inside the model, the
no-op codec's bit-identical generation, and clear errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.kv import KIVICodec, KVCalibration, KVQuantCodec, UniformCodec, fit_kvquant
from jaxcompress.kv.kvquant import num_outliers
from jaxcompress.models.build import random_model
from jaxcompress.models.cache import KVCache
from jaxcompress.models.presets import preset
from jaxcompress.models.rope import apply_rope, rope_cos_sin
from jaxcompress.ops.attention import attention_mask

KH, D = 2, 32


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def np_asym(x, axis, bits):
    """float64 reference of an asymmetric min-max grid over `axis` (fp16 scale and zero)."""
    x32 = x.astype(np.float32)
    lo, hi = x32.min(axis=axis, keepdims=True), x32.max(axis=axis, keepdims=True)
    scale = _f16((hi - lo) / np.float32(2 ** bits - 1))
    scale = np.where(scale > 0, scale, 1.0)
    zero = _f16(lo)
    return np.clip(np.round((x - zero) / scale), 0, 2 ** bits - 1) * scale + zero


def np_kivi(x, g, kb, vb):
    """KIVI of keys and values x [B, L, K, D] (L a multiple of g): float64."""
    b, n, k, d = x[0].shape
    keys = x[0].reshape(b, n // g, g, k, d)
    vals = x[1].reshape(b, n, k, d // g, g)
    return np_asym(keys, 2, kb).reshape(b, n, k, d), np_asym(vals, 4, vb).reshape(b, n, k, d)


def _kv(rng, b, n, scale=1.0):
    k = (rng.normal(size=(b, n, KH, D)) * np.linspace(0.2, 3, D)).astype(np.float32)
    return k * scale, rng.normal(size=(b, n, KH, D)).astype(np.float32)


# --------------------------------------------------------------------------------- KIVI
def test_kivi_residual_window_at_group_boundaries():
    codec = KIVICodec(key_bits=2, value_bits=4, group_size=16, residual=32, attention="reference")
    g, r = 16, 32
    rng = np.random.default_rng(0)
    k, v = _kv(rng, 2, 100)
    write = jax.jit(codec.write)
    dense = jax.jit(codec.dense)
    quantized = jax.jit(codec.quantized_length)
    # The rule: n_q = floor(max(end - R, 0) / G) * G, hand-checked at the boundaries.
    expected = {40: 0, 47: 0, 48: 16, 49: 16, 63: 16, 64: 32, 65: 32, 80: 48, 100: 64}
    state = codec.init(2, 120, KH, D, jnp.float32)
    state = write(state, jnp.asarray(k[:, :40]), jnp.asarray(v[:, :40]), jnp.int32(0))  # prefill
    for end in range(41, 101):  # then decode, one token at a time
        state = write(state, jnp.asarray(k[:, end - 1:end]), jnp.asarray(v[:, end - 1:end]), jnp.int32(end - 1))
        n_q = int(quantized(state))
        assert n_q == max(end - r, 0) // g * g
        if end in expected:
            assert n_q == expected[end], end
            assert r <= end - n_q < r + g  # between R and R + G - 1 exact tokens
            kd, vd = map(np.asarray, dense(state))
            # the window holds the newest tokens exactly ...
            np.testing.assert_array_equal(kd[:, n_q:end], k[:, n_q:end])
            np.testing.assert_array_equal(vd[:, n_q:end], v[:, n_q:end])
            # ... and the flushed groups are KIVI's grids (float64 reference)
            if n_q:
                kq, vq = np_kivi((k[:, :n_q].astype(np.float64), v[:, :n_q].astype(np.float64)), g, 2, 4)
                np.testing.assert_allclose(kd[:, :n_q], kq, rtol=0, atol=1e-5)
                np.testing.assert_allclose(vd[:, :n_q], vq, rtol=0, atol=1e-5)
    # Prefill of all 100 tokens at once stores exactly the same cache (slots past the end
    # hold provisional codes that nothing reads).
    once = write(codec.init(2, 120, KH, D, jnp.float32), jnp.asarray(k), jnp.asarray(v), jnp.int32(0))
    for a, b in zip(dense(once), dense(state)):
        np.testing.assert_array_equal(np.asarray(a)[:, :100], np.asarray(b)[:, :100])


def test_kivi_sink_is_exact_and_leaves_its_key_group_range():
    """sink=1: token 0 (here a key outlier 50x the others) is exact once flushed, and group 0's
    per-channel key range is that of tokens 1..G-1 (float64 reference with token 0 replaced by
    its group's minimum); decode step by step stores what one prefill stores."""
    codec = KIVICodec(key_bits=2, value_bits=4, group_size=16, residual=32, sink=1, attention="reference")
    g = 16
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, 64)
    k[:, 0] *= 50.0
    write, dense = jax.jit(codec.write), jax.jit(codec.dense)
    once = write(codec.init(2, 80, KH, D, jnp.float32), jnp.asarray(k), jnp.asarray(v), jnp.int32(0))
    n_q = int(codec.quantized_length(once))
    assert n_q == 32
    kd, vd = map(np.asarray, dense(once))
    np.testing.assert_array_equal(kd[:, 0], k[:, 0])
    np.testing.assert_array_equal(vd[:, 0], v[:, 0])
    k_ref = k[:, :n_q].astype(np.float64)
    k_ref[:, 0] = k_ref[:, 1:g].min(axis=1)
    kq, vq = np_kivi((k_ref, v[:, :n_q].astype(np.float64)), g, 2, 4)
    np.testing.assert_allclose(kd[:, 1:n_q], kq[:, 1:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(vd[:, 1:n_q], vq[:, 1:], rtol=0, atol=1e-5)
    # Without the sink the outlier stretches group 0: its other keys lose almost all precision.
    plain = dataclasses.replace(codec, sink=0)
    kp = np.asarray(jax.jit(plain.dense)(plain.write(plain.init(2, 80, KH, D, jnp.float32), jnp.asarray(k),
                                                     jnp.asarray(v), jnp.int32(0)))[0])
    err = lambda x: np.abs(x[:, 1:g] - k[:, 1:g]).mean()  # noqa: E731
    assert err(kd) < 0.2 * err(kp)
    state = write(codec.init(2, 80, KH, D, jnp.float32), jnp.asarray(k[:, :20]), jnp.asarray(v[:, :20]), jnp.int32(0))
    for t in range(20, 64):
        state = write(state, jnp.asarray(k[:, t:t + 1]), jnp.asarray(v[:, t:t + 1]), jnp.int32(t))
    for a, b in zip(dense(once), dense(state)):
        np.testing.assert_array_equal(np.asarray(a)[:, :64], np.asarray(b)[:, :64])


# --------------------------------------------------------------------------------- int baselines
@pytest.mark.parametrize("bits,symmetric,granularity", [(4, False, "head"), (8, True, "token"), (2, False, "tensor")])
def test_uniform_round_trip_float64(bits, symmetric, granularity):
    rng = np.random.default_rng(bits)
    k, v = _kv(rng, 2, 70)
    cal = None
    if granularity == "tensor":  # static grids, as calibrated: [lo, hi] = [-4, 4] (keys), [-2, 2]
        step = lambda span: np.float32(span / (2 ** bits - 1))  # noqa: E731
        cal = KVCalibration({"k_scale": np.full(2, step(8)), "k_zero": np.full(2, -4.0, np.float32),
                             "v_scale": np.full(2, step(4)), "v_zero": np.full(2, -2.0, np.float32)})
    codec = UniformCodec(bits, bits, symmetric, granularity, calibration=cal)
    state = codec.init_layer(1, 2, 96, KH, D, jnp.float32)
    state = jax.jit(codec.write)(state, jnp.asarray(k[:, :64]), jnp.asarray(v[:, :64]), jnp.int32(0))
    state = jax.jit(codec.write)(state, jnp.asarray(k[:, 64:]), jnp.asarray(v[:, 64:]), jnp.int32(64))
    kd, vd = (np.asarray(x)[:, :70] for x in jax.jit(codec.dense)(state))
    for got, x, lo in ((kd, k, -4.0), (vd, v, -2.0)):
        x = x.astype(np.float64)
        if granularity == "tensor":
            scale, zero = _f16(np.float32((-2 * lo) / (2 ** bits - 1))), _f16(lo)
            want = np.clip(np.round((x - zero) / scale), 0, 2 ** bits - 1) * scale + zero
        elif symmetric:  # per token over every head's channels
            x32 = x.astype(np.float32)
            scale = _f16(np.abs(x32).max(axis=(2, 3), keepdims=True) / np.float32(2 ** (bits - 1) - 1))
            want = (np.clip(np.round(x / scale) + 2 ** (bits - 1), 0, 2 ** bits - 1) - 2 ** (bits - 1)) * scale
        else:  # per token and head
            want = np_asym(x, 3, bits)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- KVQuant
def _kvquant_calibration(rng, bits=3, layers=2, n=4096):
    """A calibration fitted on synthetic keys with outlier channels (Fisher weights 1)."""
    data = []
    for _ in range(layers):
        k, v = _kv(rng, 1, n)
        k = k[0] + np.where(np.arange(D) == 5, 8.0, 0.0)  # a channel with a large offset
        data.append({"k": k, "v": v[0], "k_fisher": np.ones_like(k), "v_fisher": np.ones_like(k)})
    return fit_kvquant(data, bits, bits, 0.01)


def test_kvquant_calibration_skips_the_sink_rows():
    """With sink=s the fit ignores rows at window positions < s (the paper's sink-aware
    calibration): same arrays as a fit on the other rows alone, whatever the sink rows hold."""
    rng = np.random.default_rng(3)
    t, windows = 256, 8
    position = np.tile(np.arange(t, dtype=np.int32), windows)
    k, v = (x[0] for x in _kv(rng, 1, t * windows))
    first = position == 0
    k[first] *= 40.0  # an atypical first token with most of the Fisher mass
    fisher = np.where(first[:, None, None], 1e6, 1.0) * np.ones_like(k)
    layer = {"k": k, "v": v, "k_fisher": fisher, "v_fisher": fisher, "position": position}
    got = fit_kvquant([layer], 3, 3, 0.01, sink=1)
    rest = {name: x[~first] for name, x in layer.items() if name != "position"}
    want = fit_kvquant([rest], 3, 3, 0.01)
    for name in want.arrays:
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name])
    # without the skip the first tokens pull the datatypes (and the key ranges move)
    unskipped = fit_kvquant([layer], 3, 3, 0.01)
    assert not np.allclose(unskipped.arrays["k_codebook"], want.arrays["k_codebook"], atol=1e-3)
    with pytest.raises(ConfigError, match="position"):
        fit_kvquant([rest], 3, 3, 0.01, sink=1)


def np_kvquant(codec, cal, layer, k, v):
    """float64 reference of KVQuant's storage of k, v [B, L, K, D] (no sink)."""
    n = num_outliers(codec.outlier_fraction, D)
    mid, half = cal.arrays["k_mid"][layer].astype(np.float64), cal.arrays["k_half"][layer].astype(np.float64)
    cb_k, cb_v = (cal.arrays[f"{x}_codebook"][layer].astype(np.float64) for x in "kv")

    def nearest(x, cb):
        return cb[np.argmin(np.abs(x[..., None] - cb), axis=-1)]

    kn = (k - mid) / half
    kd = nearest(np.clip(kn, -1, 1), cb_k) * half + mid
    top = np.argsort(-np.abs(kn), axis=-1, kind="stable")[..., :n]
    outside = np.take_along_axis(np.abs(kn), top, -1) > 1
    for j in range(n):
        sel = (np.arange(D) == top[..., j:j + 1]) & outside[..., j:j + 1]
        kd = np.where(sel, k, kd)
    vtop = np.argsort(-np.abs(v), axis=-1, kind="stable")[..., :n]
    inlier = ~np.any(np.arange(D) == vtop[..., None], axis=-2)
    lo = np.where(inlier, v, np.inf).min(-1, keepdims=True)
    hi = np.where(inlier, v, -np.inf).max(-1, keepdims=True)
    vmid, vhalf = _f16((hi + lo) / 2), _f16((hi - lo) / 2)
    vd = nearest(np.clip((v - vmid) / vhalf, -1, 1), cb_v) * vhalf + vmid
    vd = np.where(~inlier, v, vd)
    return kd, vd


@pytest.fixture(scope="module")
def kvquant_setup():
    rng = np.random.default_rng(7)
    cal = _kvquant_calibration(rng)
    return cal, rng


def test_kvquant_outliers_and_sink_are_exact(kvquant_setup):
    cal, rng = kvquant_setup
    codec = KVQuantCodec(3, 3, 0.01, sink=1, calibration=cal)
    k, v = _kv(rng, 2, 40)
    k[0, 7, 1, 3] = 50.0  # far outside the calibrated range of its channel
    v[1, 9, 0, 11] = -30.0
    positions = np.broadcast_to(np.arange(40) - 3, (2, 40)).copy()  # three padding slots first
    positions[:, :3] = -1
    state = jax.jit(codec.write)(codec.init_layer(1, 2, 64, KH, D, jnp.float32), jnp.asarray(k), jnp.asarray(v),
                                 jnp.int32(0), jnp.asarray(positions))
    kd, vd = (np.asarray(x)[:, :40] for x in jax.jit(codec.dense)(state))
    assert kd[0, 7, 1, 3] == 50.0 and vd[1, 9, 0, 11] == -30.0
    # the first real token (position 0, slot 3) is the attention sink: exact
    np.testing.assert_array_equal(kd[:, 3], k[:, 3])
    np.testing.assert_array_equal(vd[:, 3], v[:, 3])
    # every other slot is the float64 reference (outliers exact, the rest on the datatypes)
    kref, vref = np_kvquant(codec, cal, 1, k.astype(np.float64), v.astype(np.float64))
    rest = np.arange(40) != 3
    np.testing.assert_allclose(kd[:, rest], kref[:, rest], rtol=0, atol=1e-5)
    np.testing.assert_allclose(vd[:, rest], vref[:, rest], rtol=0, atol=1e-5)
    # about outlier_fraction of the key entries fall outside the calibrated ranges
    kn = (k[:, 3:] - cal.arrays["k_mid"][1]) / cal.arrays["k_half"][1]
    assert 0.002 < np.mean(np.abs(kn) > 1) < 0.05


@pytest.mark.parametrize("attention", ["reference", "interpret"])
def test_kvquant_pre_rope_equals_quantize_then_rotate(kvquant_setup, attention):
    """Attention over the stored pre-RoPE keys = attention over RoPE(dequantized keys)."""
    cal, rng = kvquant_setup
    cfg = dataclasses.replace(preset("tiny"), head_dim=D, num_kv_heads=KH, num_heads=2 * KH)
    codec = KVQuantCodec(3, 3, 0.01, sink=1, calibration=cal, attention=attention)
    k, v = _kv(rng, 2, 50)
    q = rng.normal(size=(2, 1, 2 * KH, D)).astype(np.float32)
    pos = np.broadcast_to(np.arange(50), (2, 50))
    state = jax.jit(codec.write)(codec.init_layer(0, 2, 64, KH, D, jnp.float32), jnp.asarray(k), jnp.asarray(v),
                                 jnp.int32(0), jnp.asarray(pos))
    slot_pos = np.full((2, 64), -1)
    slot_pos[:, :50] = pos
    cos, sin = rope_cos_sin(cfg, jnp.maximum(jnp.asarray(slot_pos), 0))

    def rotate(x):
        return apply_rope(x, cos, sin)

    rotate.cos_sin = (cos, sin)  # what the model's attention layer passes
    mask = attention_mask(jnp.asarray(pos[:, -1:]), jnp.asarray(slot_pos), None)
    out = jax.jit(lambda s, q: codec.attend(s, q, mask, D ** -0.5, rotate_keys=rotate))(state, jnp.asarray(q))
    # float64: dequantize (sink exact), rotate, attend
    kref, vref = np_kvquant(codec, cal, 0, k.astype(np.float64), v.astype(np.float64))
    kref[:, 0], vref[:, 0] = k[:, 0], v[:, 0]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2) / D)
    ang = pos[..., None] * inv
    c, s_ = np.cos(np.concatenate([ang, ang], -1))[:, :, None], np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    krot = kref * c + np.concatenate([-kref[..., D // 2:], kref[..., :D // 2]], -1) * s_
    qg = q[:, 0].reshape(2, KH, 2, D).astype(np.float64)
    scores = np.einsum("bkgd,bskd->bkgs", qg, krot) * D ** -0.5
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bkgs,bskd->bkgd", p / p.sum(-1, keepdims=True), vref).reshape(2, 1, 2 * KH, D)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------- in the model
def _decode_logits(model, cfg, codec, tokens, prefill):
    """Logits of a prefill then one-token decode steps, every step jitted."""
    from flax import nnx

    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, toks, pos, cache):
        return nnx.merge(graphdef, params)(toks, pos, cache)

    b, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    cache = KVCache.create(cfg, b, n + 8, jnp.float32, codec)
    out, cache = step(params, tokens[:, :prefill], pos[:, :prefill], cache)
    outs = [out]
    for t in range(prefill, n):
        out, cache = step(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(out)
    return np.asarray(jnp.concatenate(outs, axis=1))


@pytest.fixture(scope="module")
def small_model():
    """One decoder layer (compiles fast), head_dim 32 (the kernel's RoPE halves need >= 16)."""
    cfg = dataclasses.replace(preset("tiny"), head_dim=D, num_kv_heads=KH, num_heads=2 * KH, num_layers=1)
    return cfg, random_model(cfg, jnp.float32)


@pytest.mark.parametrize("which", ["kivi", "kivi_sink", "kvquant"])
def test_decode_kernel_path_matches_reference_in_model(small_model, kvquant_setup, which):
    """The Pallas path (interpret mode) inside the model = the dequantize-then-attend path
    (kivi_sink: the sink token moves from the window to the sink list at the flush, and must be
    attended once)."""
    cfg, model = small_model
    codec = {"kivi": KIVICodec(2, 2, group_size=16, residual=16),
             "kivi_sink": KIVICodec(2, 2, group_size=16, residual=16, sink=1),
             "kvquant": KVQuantCodec(3, 3, calibration=kvquant_setup[0])}[which]
    # prefill 30, decode 8 steps: KIVI's window flushes a group at 32 (interpret mode is slow per step)
    tokens = jax.random.randint(jax.random.key(3), (2, 38), 0, cfg.vocab_size)
    ref = _decode_logits(model, cfg, dataclasses.replace(codec, attention="reference"), tokens, 30)
    out = _decode_logits(model, cfg, dataclasses.replace(codec, attention="interpret"), tokens, 30)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_bf16_cache_decode_kernel_matches_reference_in_model(small_model):
    """The plain cache's decode attention through the dense flash-decoding kernel (interpret
    mode, which the GPU runs compiled) = XLA's dot-softmax-dot, over a cache of 32 slots of which
    the kernel reads only those written (prefill 17, then 7 decode steps)."""
    from jaxcompress.models.cache import IdentityCodec

    cfg, model = small_model
    tokens = jax.random.randint(jax.random.key(4), (2, 24), 0, cfg.vocab_size)
    ref = _decode_logits(model, cfg, IdentityCodec(attention="reference"), tokens, 17)
    out = _decode_logits(model, cfg, IdentityCodec(attention="interpret"), tokens, 17)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_dense_decode_attention_reads_only_written_slots():
    """Left padding, a hole and unwritten slots holding NaN: the kernel (interpret, bf16) reads
    only up to the last slot any row may attend and equals float64 attention."""
    from jaxcompress.kv.base import dense_decode_attention, written_length

    rng = np.random.default_rng(7)
    b, s, kh, g, d = 2, 64, 2, 2, 32
    q = rng.normal(size=(b, 1, kh * g, d))
    k, v = rng.normal(size=(2, b, s, kh, d))
    mask = np.zeros((b, 1, s), bool)
    mask[0, 0, :40] = True
    mask[1, 0, 5:40] = True   # left padding
    mask[1, 0, 20] = False    # a hole
    assert int(written_length(jnp.asarray(mask[:, 0]))) == 40
    k[:, 48:], v[:, 48:] = np.nan, np.nan  # beyond the written blocks: never read
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    got = dense_decode_attention(bf(q), bf(k), bf(v), jnp.asarray(mask), d ** -0.5, rows=16, interpret=True)
    q64, k64, v64 = (np.asarray(bf(x), np.float64) for x in (q, k, v))
    k64, v64 = np.nan_to_num(k64), np.nan_to_num(v64)
    kk = np.repeat(k64, g, axis=2)
    vv = np.repeat(v64, g, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q64, kk) * d ** -0.5
    scores = np.where(mask[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, vv)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-2)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    with pytest.raises(ConfigError, match="divisible by one of .* 60 slots"):
        dense_decode_attention(bf(q), bf(k[:, :60]), bf(v[:, :60]), jnp.asarray(mask[..., :60]), 1.0,
                               rows=None, interpret=True)


def test_noop_codec_generation_is_bit_identical(small_model):
    """KIVI whose window covers the whole cache never quantizes: generation (and the logits of
    prefill and decode) equal the uncompressed cache's bit for bit."""
    from jaxcompress.models.generate import SamplingConfig, generate_tokens

    cfg, model = small_model
    prompts = [[5, 17, 9, 44, 3, 8, 100, 2, 7], [11, 12, 13]]  # left-padded to 64, 64 new slots
    noop = KIVICodec(2, 2, group_size=16, residual=128, attention="reference")
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20)
    base = generate_tokens(model, prompts, sampling, seed=3)
    assert generate_tokens(model, prompts, sampling, seed=3, codec=noop) == base
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 20)))
    want = _decode_logits(model, cfg, None, tokens, 16)
    np.testing.assert_array_equal(_decode_logits(model, cfg, dataclasses.replace(noop, residual=28), tokens, 16), want)


# --------------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ConfigError, match="key_bits=5 is not supported"):
        KIVICodec(key_bits=5)
    with pytest.raises(ConfigError, match="value_bits=1"):
        UniformCodec(8, 1)
    with pytest.raises(ConfigError, match="key_bits=6"):
        KVQuantCodec(key_bits=6)
    with pytest.raises(ConfigError, match="group_size=48 does not divide head_dim=64"):
        KIVICodec(group_size=48).init(1, 64, 2, 64, jnp.float32)
    with pytest.raises(ConfigError, match="needs calibration"):
        KVQuantCodec().init(1, 64, 2, 64, jnp.float32)
    with pytest.raises(ConfigError, match="granularity 'tensor' needs calibrated"):
        UniformCodec(granularity="tensor").init(1, 64, 2, 64, jnp.float32)
    with pytest.raises(ConfigError, match="attention="):
        KIVICodec(attention="fast")
    with pytest.raises(ConfigError, match=r"KIVI sink=32 must be an integer in \[0, group_size=32\)"):
        KIVICodec(sink=32)
    cfg = preset("tiny")
    model = random_model(cfg, jnp.float32)
    cache = KVCache.create(cfg, 1, 16, jnp.float32, KIVICodec(group_size=16, residual=16))
    with pytest.raises(UserError, match="context of 20 tokens is longer than the KV cache"):
        model(jnp.zeros((1, 20), jnp.int32), None, cache)


def test_kivi_store_layout_choice():
    """auto: channel_words (the CUDA-core decode body) where it fits, else token_rows; asking for
    channel_words where it does not fit is an error that names the condition."""
    assert KIVICodec(2, 2).store_layout == "channel_words" and KIVICodec(4, 4, group_size=16).store_layout == "channel_words"
    for codec in (KIVICodec(3, 3), KIVICodec(4, 2), KIVICodec(group_size=48), KIVICodec(8, 8, group_size=32, columns=4)):
        assert codec.store_layout == "token_rows", codec
    assert KIVICodec(2, 2, layout="token_rows").store_layout == "token_rows"
    with pytest.raises(ConfigError, match="layout=channel_words needs key_bits == value_bits"):
        KIVICodec(4, 2, layout="channel_words")
    with pytest.raises(ConfigError, match="columns=12 must be 4, 8, 16, 32 or 64"):
        KIVICodec(columns=12)


def test_kivi_values_pass_reaches_the_decode_kernel():
    """`values_pass` (recipe `kv_cache.values_pass`) picks the cw2 body's values pass: wgmma gives
    bit for bit what the kernel gives with `Cw2Config(values="wgmma")` named (its CPU model here; the
    default on the CPU, the f16x2 pass, rounds otherwise); anything else is a clear error."""
    from jaxcompress.kv.bench import filled_layer
    from jaxcompress.kv.recipe import normalize_section
    from pallas_kernels.decode_attention import Cw2Config

    cfg = preset("smollm2-135m")
    q = jax.random.normal(jax.random.key(3), (1, 1, cfg.num_heads, cfg.head_dim), jnp.float32).astype(jnp.bfloat16)
    codec = KIVICodec(2, 2, group_size=32, residual=32, attention="interpret", values_pass="wgmma")
    assert codec.decode_kernel_options() == {"cw2": Cw2Config(values="wgmma")}
    assert dataclasses.replace(codec, values_pass="auto").decode_kernel_options() == {}
    inputs = filled_layer(cfg, codec, 1, 512)
    attend = functools.partial(codec.attend_decode, inputs.state, q, inputs.mask, cfg.head_dim ** -0.5)
    wgmma = np.asarray(attend().astype(jnp.float32))
    named = dataclasses.replace(codec, values_pass="auto").attend_decode(
        inputs.state, q, inputs.mask, cfg.head_dim ** -0.5, cw2=Cw2Config(values="wgmma"))
    np.testing.assert_array_equal(wgmma, np.asarray(named.astype(jnp.float32)))
    assert normalize_section({"method": "kivi", "values_pass": "cuda"})["values_pass"] == "cuda"
    with pytest.raises(ConfigError, match="KIVI values_pass='tensor' must be one of"):
        normalize_section({"method": "kivi", "values_pass": "tensor"})


def test_kivi_flushes_all_layers_under_one_conditional():
    """flush_per_step (the default): a decode step flushes every layer's due group under one
    conditional (a GPU conditional is a round trip to the host), not one a layer; the logits
    over the flushes (prefill 30, groups leave the window at 32 and 48, sink token included)
    equal the per-layer flushes' bit for bit."""
    cfg = dataclasses.replace(preset("tiny"), head_dim=D, num_kv_heads=KH, num_heads=2 * KH, num_layers=3)
    model = random_model(cfg, jnp.float32)
    tokens = jax.random.randint(jax.random.key(4), (2, 50), 0, cfg.vocab_size)
    per_step = KIVICodec(2, 2, group_size=16, residual=16, sink=1, attention="reference")
    per_layer = dataclasses.replace(per_step, flush_per_step=False)
    np.testing.assert_array_equal(_decode_logits(model, cfg, per_step, tokens, 30),
                                  _decode_logits(model, cfg, per_layer, tokens, 30))

    def conds(codec):
        cache = KVCache.create(cfg, 2, 64, jnp.float32, codec)
        one = jnp.zeros((2, 1), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda c: model(one, one, c))(cache)
        return str(jaxpr).count(" cond[")

    assert (conds(per_step), conds(per_layer)) == (1, cfg.num_layers)
