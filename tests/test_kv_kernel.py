"""The Pallas decode-attention kernels (interpret mode on the CPU) against their pure-JAX
references, over every store layout the codecs produce, lengths that are and are not multiples
of the kernel block, GQA padding, masks and several splits. Also: the kernels lower to Triton
for CUDA (no GPU needed to catch lowering errors)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.kv.store import NO_OUTLIER, QTokens, pack_tokens
from pallas_kernels import decode_attention as da

B, K, G, D = 2, 2, 3, 64  # G = 3 query heads per kv head: padded to 16 rows in the kernel
SCALE = D ** -0.5


def _store(rng, b, s, bits, rows, token_group, channel_group, *, zero=True, codebook=False,
           outliers=0, shared_batch=False, shared_head=False, meta_dtype=np.float16, d=D, channel_words=False):
    """A random store; channel_words: the same draws written through the layout's own writes."""
    codes = rng.integers(0, 2 ** bits, size=(b, K, s, d))
    ts = {0: 1, 1: s}.get(token_group, s // max(token_group, 1))
    cs = d // channel_group
    shape = (1 if shared_batch else b, 1 if shared_head else K, ts, cs)
    scale = rng.uniform(0.2, 0.6, size=shape).astype(meta_dtype)
    if channel_words:
        words = jnp.zeros((b, K, d, s // (32 // bits)), jnp.int32)
        meta = lambda x: jnp.zeros(x.shape[:2] + x.shape[2:][::-1], x.dtype)  # noqa: E731
        store = QTokens(words, meta(scale), meta(scale) if zero else None, bits=bits, token_group=token_group,
                        channel_group=channel_group, layout="channel_words")
        arrays = {"scale": jnp.asarray(scale)}
        if zero:
            arrays["zero"] = jnp.asarray(rng.normal(size=shape).astype(meta_dtype))
        return store.with_codes(jnp.asarray(codes), 0).with_meta(0, **arrays)
    extra = {}
    if zero:
        extra["zero"] = jnp.asarray(rng.normal(size=shape).astype(meta_dtype))
    if codebook:
        extra["codebook"] = jnp.asarray(np.sort(rng.uniform(-1, 1, 2 ** bits)).astype(np.float32))
    if outliers:
        idx = rng.integers(0, D, size=(b, K, s, outliers))
        idx[rng.random(idx.shape) < 0.3] = NO_OUTLIER
        extra["outlier_index"] = jnp.asarray(idx.astype(np.uint8))
        extra["outlier_value"] = jnp.asarray((3 * rng.normal(size=idx.shape)).astype(np.float32))
    return QTokens(pack_tokens(jnp.asarray(codes), bits, rows), jnp.asarray(scale), bits=bits, rows=rows,
                   token_group=token_group, channel_group=channel_group, **extra)


def _layout(name, rng, s):
    if name == "kivi-k2v2":  # keys per channel over 32-token groups, values per token over 32 channels
        return (_store(rng, B, s, 2, 32, 32, 1), _store(rng, B, s, 2, 32, 1, 32), None)
    if name == "kivi-k4v2":  # different packing blocks for keys and values
        return (_store(rng, B, s, 4, 32, 32, 1), _store(rng, B, s, 2, 32, 1, 32), None)
    if name == "kivi-k3v4":  # 10 codes per word, blocks of 320 tokens
        return (_store(rng, B, s, 3, 32, 32, 1), _store(rng, B, s, 4, 32, 1, 16), None)
    if name == "kvquant-k3v3":  # codebooks, static per-channel key ranges, outliers, RoPE
        keys = _store(rng, B, s, 3, 32, 0, 1, codebook=True, outliers=2, shared_batch=True,
                      meta_dtype=np.float32)
        values = _store(rng, B, s, 3, 32, 1, D, codebook=True, outliers=2)
        angles = rng.uniform(0, 2 * np.pi, size=(B, s, D // 2)).astype(np.float32)
        return keys, values, (jnp.cos(angles), jnp.sin(angles))
    if name == "int8-sym-per-token":  # one scale per token shared by the heads, no zero point
        return (_store(rng, B, s, 8, 32, 1, D, zero=False, shared_head=True),
                _store(rng, B, s, 8, 32, 1, D, zero=False, shared_head=True), None)
    raise ValueError(name)


CASES = [  # layout, capacity, lengths (one not a multiple of the block), splits
    ("kivi-k2v2", 1024, (700, 1024), None),
    ("kivi-k4v2", 1024, (1000,), 3),
    ("kvquant-k3v3", 640, (600, 75), 2),
    ("int8-sym-per-token", 384, (300,), None),
]


@pytest.mark.parametrize("layout,s,lengths,splits", CASES, ids=[c[0] for c in CASES])
def test_quantized_kernel_equals_reference(layout, s, lengths, splits):
    rng = np.random.default_rng(len(layout))
    k, v, rope = _layout(layout, rng, s)
    q = jnp.asarray(rng.normal(size=(B, K, G, D)).astype(np.float32))
    mask = jnp.asarray(rng.random((B, s)) < 0.8)

    def run(length, dot_dtype):
        return da.quantized_decode_partials(q, k, v, mask, jnp.int32(length), scale=SCALE, rope=rope,
                                            num_splits=splits, dot_dtype=dot_dtype, interpret=True,
                                            path="mma")  # the tensor-core body (CW_CASES: the other)

    for length in lengths:
        ref = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=SCALE, rope=rope)])
        out = da.combine([run(length, jnp.float32)])
        assert out.shape == (B, K, G, D)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0,
                                   atol=2e-5 * float(jnp.abs(ref).max()))
    if layout != "kivi-k2v2":
        return
    # bf16 operands on the tensor cores: the same function within bf16 rounding
    out = da.combine([run(lengths[0], jnp.bfloat16)])
    ref = da.combine([da.quantized_decode_reference(q, k, v, mask, lengths[0], scale=SCALE, rope=rope)])
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2


def test_partials_combine_with_exact_tokens():
    """Kernel partials merged with a dense partial equal attention over the union."""
    rng = np.random.default_rng(1)
    k, v, _ = _layout("kivi-k2v2", rng, 1024)  # the shapes of a case above: no new compilation
    q = jnp.asarray(rng.normal(size=(B, K, G, D)).astype(np.float32))
    mask = jnp.ones((B, 1024), bool)
    ke = jnp.asarray(rng.normal(size=(B, 5, K, D)).astype(np.float32))
    ve = jnp.asarray(rng.normal(size=(B, 5, K, D)).astype(np.float32))
    emask = jnp.asarray([[True] * 5, [True, False, True, False, False]])
    # the kernel's splits unmerged ([B, K, splits, G, ...]) beside a merged partial: one combine
    split = da.quantized_decode_partials(q, k, v, mask, jnp.int32(300), scale=SCALE, dot_dtype=jnp.float32,
                                         num_splits=2, interpret=True, merge=False)
    assert split.m.shape == (B, K, 2, G) and split.o.shape == (B, K, 2, G, D)
    parts = [split, da.dense_partials(q, ke, ve, emask, SCALE)]
    kd = jnp.concatenate([k.dequantize().transpose(0, 2, 1, 3)[:, :300], ke], axis=1)
    vd = jnp.concatenate([v.dequantize().transpose(0, 2, 1, 3)[:, :300], ve], axis=1)
    full = da.combine([da.dense_partials(q, kd, vd, jnp.concatenate([mask[:, :300], emask], 1), SCALE)])
    np.testing.assert_allclose(np.asarray(da.combine(parts)), np.asarray(full), rtol=0, atol=1e-5)
    merged = da.combine([da.merge_splits(split), parts[1]])
    np.testing.assert_allclose(np.asarray(merged), np.asarray(full), rtol=0, atol=1e-5)


def test_dense_bf16_kernel_equals_reference():
    rng = np.random.default_rng(2)
    s = 320
    q = jnp.asarray(rng.normal(size=(B, K, G, D)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(B, s, K, D)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, s, K, D)), jnp.bfloat16)
    mask = jnp.asarray(rng.random((B, s)) < 0.9)
    for length in (s, 250):
        ref = da.combine([da.dense_decode_reference(q, k, v, mask, length, scale=SCALE)])
        out = da.combine([da.dense_decode_partials(q, k, v, mask, jnp.int32(length), scale=SCALE, num_splits=2,
                                                   interpret=True)])
        assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2


def test_kernel_errors_are_clear():
    rng = np.random.default_rng(3)
    k, v, _ = _layout("kivi-k2v2", rng, 512)
    q = jnp.zeros((B, K, G, D))
    with pytest.raises(Exception, match="mask shape"):
        da.quantized_decode_partials(q, k, v, jnp.ones((B, 100), bool), 10, scale=SCALE, interpret=True)
    with pytest.raises(Exception, match="multiple of 64"):
        kd = jnp.zeros((B, 100, K, D))
        da.dense_decode_partials(q, kd, kd, jnp.ones((B, 100), bool), 10, scale=SCALE, interpret=True)


@pytest.mark.parametrize("layout", ["kivi-k2v2", "kvquant-k3v3"])
def test_kernels_lower_to_triton_for_cuda(layout):
    """Lowering (Pallas -> Triton IR) runs without a GPU: export for the cuda platform."""
    from jax import export

    rng = np.random.default_rng(4)
    s = 1024 if layout == "kivi-k2v2" else 960
    k, v, rope = _layout(layout, rng, s)
    q = jnp.zeros((1, K, 1, D), jnp.bfloat16)
    k, v = jax.tree.map(lambda x: x[:1] if x.shape[0] == B else x, (k, v))
    rope = None if rope is None else tuple(t[:1] for t in rope)
    mask = jnp.ones((1, s), bool)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    stores = [(k, v)]
    if layout == "kivi-k2v2":  # the same shapes in the channel_words layout: the cw body
        stores.append(tuple(_store(rng, 1, s, 2, 32, tg, cg, channel_words=True) for tg, cg in ((32, 1), (1, 32))))
    for ks, vs in stores:
        fn = jax.jit(lambda q, k, v, m: da.quantized_decode_partials(q, k, v, m, 1000, scale=SCALE, rope=rope))
        text = export.export(fn, platforms=["cuda"], disabled_checks=checks)(q, ks, vs, mask).mlir_module()
        assert "__gpu$xla.gpu.triton" in text
    kd = jnp.zeros((1, s, K, D), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, m: da.dense_decode_partials(q, k, v, m, 1000, scale=SCALE))
    assert "__gpu$xla.gpu.triton" in export.export(fn, platforms=["cuda"], disabled_checks=checks)(
        q, kd, kd, mask).mlir_module()


def test_supports_names_the_shapes_the_kernel_tiles():
    rng = np.random.default_rng(5)
    k, v, _ = _layout("kivi-k2v2", rng, 512)
    assert da.supports(k, v, pre_rope=False) and da.supports(k, v, pre_rope=True)  # D/2 = 32 tiles
    narrow = _store(rng, B, 512, 2, 32, 1, 8)  # value channel groups of 8: below the dot's 16
    assert not da.supports(k, narrow, pre_rope=False)


# The CUDA-core bodies "cw" and "cw16" (channel_words stores) against the reference: KIVI-2 with Llama-2's
# G = 1 and head_dim 128 (16 slots a word: both the in-place and the shifted top slots), 4-bit
# with GQA (G = 4: two programs of two heads) and symmetric keys and values, 8-bit with G = 3
# (programs of one head); lengths that are and are not multiples of the 32-column block.
CW_CASES = [  # bits, head_dim, G, capacity, length, key group, value group, zero points, splits
    (2, 128, 1, 1024, 700, 32, 32, True, 2),
    (4, 64, 4, 512, 512, 32, 16, False, None),
    (8, 64, 3, 256, 200, 16, 32, True, 3),
]


# The fp32 "cw" body agrees with the reference to fp32 rounding. The packed fp16 "cw16" (interpret
# mode runs its arithmetic through jnp on fp16; the inline assembly itself runs in tests/gpu)
# rounds by 2**-11 an operation: keys sum D / 16 products a half-word, values c / 2 terms a tile,
# and 8-bit codes reach +-128, so their partial sums carry more absolute rounding.
CW_TOLERANCE = {"cw": lambda bits: 2e-5, "cw16": lambda bits: 2e-3 if bits <= 4 else 4e-3}
CW_TOLERANCE["cw2"] = CW_TOLERANCE["cw16"]  # the same f16x2 arithmetic in two passes


@pytest.mark.parametrize("path", ["cw", "cw16", "cw2"])
@pytest.mark.parametrize("bits,d,g,s,length,kg,vg,zero,splits", CW_CASES,
                         ids=[f"k{c[0]}v{c[0]}-d{c[1]}-g{c[2]}" for c in CW_CASES])
def test_cuda_core_bodies_equal_reference(bits, d, g, s, length, kg, vg, zero, splits, path):
    rng = np.random.default_rng(bits + g)
    k = _store(rng, B, s, bits, 32, kg, 1, zero=zero, d=d, channel_words=True)
    v = _store(rng, B, s, bits, 32, 1, vg, zero=zero, d=d, channel_words=True)
    assert da.cw_supports(k, v, False) and da.kernel_path("auto", k, v, False) == ("cw2" if bits <= 4 else "cw")
    q = jnp.asarray(rng.normal(size=(B, K, g, d)).astype(np.float32))
    mask = jnp.asarray(rng.random((B, s)) < 0.8)
    ref = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=d ** -0.5)])
    # cw2 given explicitly: the k2v2-d128 case then compiles once for the _cw2_case tests below too
    out = da.combine([da.quantized_decode_partials(q, k, v, mask, jnp.int32(length), scale=d ** -0.5,
                                                   num_splits=splits, interpret=True, path=path, cw2=da.Cw2Config())])
    assert out.shape == (B, K, g, d)
    top = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=CW_TOLERANCE[path](bits) * top)
    if path != "cw":  # really the fp16 arithmetic: outside what the fp32 body rounds to
        assert float(jnp.abs(out - ref).max()) > CW_TOLERANCE["cw"](bits) * top


def test_kernel_path_choice_and_errors():
    rng = np.random.default_rng(6)
    k, v, _ = _layout("kivi-k2v2", rng, 512)  # token_rows
    assert da.kernel_path("auto", k, v, False) == "mma"
    with pytest.raises(Exception, match="path 'cw' does not read these stores.*token_rows"):
        da.kernel_path("cw", k, v, False)
    kc = _store(rng, B, 512, 2, 32, 32, 1, channel_words=True)
    vc = _store(rng, B, 512, 2, 32, 1, 32, channel_words=True)
    assert da.kernel_path("auto", kc, vc, False) == "cw2" and da.supports(kc, vc, False)
    assert da.kernel_path("auto", kc, vc, False, exact=True) == "cw"  # fp32 dots: exact arithmetic
    assert all(da.kernel_path(p, kc, vc, False) == p for p in ("cw", "cw16", "cw2"))
    # cw2 sums keys 8 channels at a time: other head sizes get cw16, or a clear error when asked for
    k36, v36 = (_store(rng, B, 512, 2, 32, *groups, channel_words=True, d=36) for groups in ((32, 1), (1, 12)))
    assert da.kernel_path("auto", k36, v36, False) == "cw16"
    with pytest.raises(Exception, match="'cw2' sums keys 8 channels.*head_dim 36.*path='cw16'"):
        da.kernel_path("cw2", k36, v36, False)
    with pytest.raises(Exception, match="path 'mma' does not read these stores.*channel_words"):
        da.kernel_path("mma", kc, vc, False)
    with pytest.raises(Exception, match="path 'cw16' does not read these stores.*token_rows"):
        da.kernel_path("cw16", k, v, False)
    v32 = dataclasses.replace(vc, scale=vc.scale.astype(jnp.float32))  # the f16x2 body reads fp16 meta only
    with pytest.raises(Exception, match=r"cw16 decode body reads fp16.*'value scale': 'float32'.*path='cw'"):
        da.quantized_decode_partials(jnp.zeros((B, K, 1, kc.head_dim)), kc, v32, jnp.ones((B, 512), bool), 10,
                                     scale=SCALE, interpret=True, path="cw16")
    assert not da.supports(kc, vc, pre_rope=True)  # pre-RoPE keys: the mma body only
    with pytest.raises(Exception, match="decode kernel path 'tensor'"):
        da.kernel_path("tensor", k, v, False)
    with pytest.raises(Exception, match="share layout"):
        da.quantized_decode_partials(jnp.zeros((B, K, 1, D)), kc, v, jnp.ones((B, 512), bool), 10, scale=SCALE,
                                     interpret=True)


def test_kernel_tuning_knobs_from_the_environment_are_checked(monkeypatch):
    """$JAXCOMPRESS_KV_VALUE_CHANNELS / _NUM_WARPS must be positive integers: anything else is a
    clear error naming the variable, not a ValueError from int()."""
    rng = np.random.default_rng(9)
    kc = _store(rng, B, 512, 2, 32, 32, 1, channel_words=True)
    vc = _store(rng, B, 512, 2, 32, 1, 32, channel_words=True)
    q = jnp.zeros((B, K, 1, kc.head_dim))
    for name in ("JAXCOMPRESS_KV_NUM_WARPS", "JAXCOMPRESS_KV_VALUE_CHANNELS"):
        monkeypatch.setenv(name, "four")
        with pytest.raises(Exception, match=rf"\${name}='four' must be a positive integer"):
            da._env_int(name, 4)
        monkeypatch.delenv(name)
    assert da._env_int("JAXCOMPRESS_KV_VALUE_CHANNELS", 32) == 32
    monkeypatch.setenv("JAXCOMPRESS_KV_NUM_WARPS", "0")
    with pytest.raises(Exception, match="JAXCOMPRESS_KV_NUM_WARPS='0' must be a positive integer"):
        da.quantized_decode_partials(q, kc, vc, jnp.ones((B, 512), bool), 10, scale=SCALE, interpret=True, path="cw16")


def _cw2_case_inputs():
    """(keys, values, q, mask) of CW_CASES[0] (KIVI-2, head_dim 128) with a random mask."""
    bits, d, g, s, length, kg, vg, zero, splits = CW_CASES[0]
    rng = np.random.default_rng(bits + g)
    k = _store(rng, B, s, bits, 32, kg, 1, zero=zero, d=d, channel_words=True)
    v = _store(rng, B, s, bits, 32, 1, vg, zero=zero, d=d, channel_words=True)
    q = jnp.asarray(rng.normal(size=(B, K, g, d)).astype(np.float32))
    return k, v, q, jnp.asarray(rng.random((B, s)) < 0.8)


def _cw2_case():
    """(run(config, keys=None): the cw2 output, the float reference, the keys) of CW_CASES[0]
    (KIVI-2, head_dim 128, two splits) with a random mask."""
    bits, d, g, s, length, kg, vg, zero, splits = CW_CASES[0]
    k, v, q, mask = _cw2_case_inputs()

    def run(config, keys=None):
        return da.combine([da.quantized_decode_partials(q, k if keys is None else keys, v, mask, jnp.int32(length),
                                                        scale=d ** -0.5, num_splits=splits, interpret=True,
                                                        path="cw2", cw2=config)])

    return run, da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=d ** -0.5)]), k


def test_cw2_value_channels_keep_the_arithmetic():
    """`Cw2Config.value_channels` splits the values pass's channel rows over more or fewer
    programs, never the arithmetic: 8 rows a program give the default's output bit for bit
    (KIVI-2, head_dim 128, two splits); `columns` changes the tiles and splits (and so the fp16
    roundings) only; a bad setting is a clear error."""
    run, ref, _ = _cw2_case()
    default = run(da.Cw2Config())
    tuned = run(da.Cw2Config(value_channels=8))
    np.testing.assert_array_equal(np.asarray(tuned), np.asarray(default))
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(ref), rtol=0,
                               atol=CW_TOLERANCE["cw2"](CW_CASES[0][0]) * float(jnp.abs(ref).max()))
    with pytest.raises(Exception, match="value_channels=24 must be a power of two"):
        da.Cw2Config(value_channels=24)
    # a tile of 32 word columns (one warp) instead of 128: other splits, so other split maxima and
    # fp16 roundings of p * scale (not bit for bit), within the same bound of the reference
    narrow = run(da.Cw2Config(columns=32))
    assert not np.array_equal(np.asarray(narrow), np.asarray(default))
    np.testing.assert_allclose(np.asarray(narrow), np.asarray(ref), rtol=0,
                               atol=CW_TOLERANCE["cw2"](CW_CASES[0][0]) * float(jnp.abs(ref).max()))
    with pytest.raises(Exception, match="columns=96 must be a power of two"):
        da.Cw2Config(columns=96)


def test_cw2_keys_zero_sums_the_zero_term_in_the_keys_pass():
    """`Cw2Config(keys_zero=True)`: the keys pass sums q . zero from the zero points itself (no
    XLA einsum). Same scores up to fp32 summation order: the outputs agree with the einsum's to
    1e-5 of the largest, and with the float reference to the f16x2 bound; it is the default on a
    small grid (B x K <= SMALL_GRID_HEADS); symmetric keys (no zero points) take the path without
    a term."""
    run, ref, k = _cw2_case()
    bits, d, _, s, _, kg, _, _, _ = CW_CASES[0]
    einsum, in_pass = run(da.Cw2Config(keys_zero=False)), run(da.Cw2Config(keys_zero=True))
    np.testing.assert_array_equal(np.asarray(run(da.Cw2Config())), np.asarray(in_pass))  # default on a small grid
    top = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(in_pass), np.asarray(einsum), rtol=0, atol=1e-5 * top)
    np.testing.assert_allclose(np.asarray(in_pass), np.asarray(ref), rtol=0, atol=CW_TOLERANCE["cw2"](bits) * top)
    # a wrong zero term would move the scores by q . zero: make the zero points matter
    assert float(jnp.abs(run(da.Cw2Config(keys_zero=True), dataclasses.replace(k, zero=k.zero * 0)) - in_pass).max()) > 1e-2 * top
    # symmetric keys: no term to sum, the option has nothing to act on (one compile; its reference)
    ks = _store(np.random.default_rng(1), B, s, bits, 32, kg, 1, zero=False, d=d, channel_words=True)
    _, v, q, mask = _cw2_case_inputs()
    sym_ref = da.combine([da.quantized_decode_reference(q, ks, v, mask, CW_CASES[0][4], scale=d ** -0.5)])
    np.testing.assert_allclose(np.asarray(run(da.Cw2Config(keys_zero=True), ks)), np.asarray(sym_ref), rtol=0,
                               atol=CW_TOLERANCE["cw2"](bits) * float(jnp.abs(sym_ref).max()))


def test_cw2_key_prefetch_keeps_the_arithmetic():
    """`Cw2Config.key_prefetch`: the keys pass keeps 1, 2 (the default where it divides its steps)
    or 4 steps of loads in flight (register slots refilled in turn), the same arithmetic: bit for
    bit one output. A depth that does not divide the pass's steps, or another than 1, 2, 4, is a
    clear error; the default falls back to 1 step where 2 do not divide them."""
    run, ref, _ = _cw2_case()
    default = np.asarray(run(da.Cw2Config()))  # 2 steps ahead: 16 steps of 8 channel rows divide
    for depth in (1, 4):
        np.testing.assert_array_equal(np.asarray(run(da.Cw2Config(key_prefetch=depth))), default)
    np.testing.assert_allclose(default, np.asarray(ref), rtol=0,
                               atol=CW_TOLERANCE["cw2"](CW_CASES[0][0]) * float(jnp.abs(ref).max()))
    with pytest.raises(Exception, match="key_prefetch=3 must be 1, 2 or 4"):
        da.Cw2Config(key_prefetch=3)
    bits, _, g, s, length, kg, vg, zero, splits = CW_CASES[0]
    rng = np.random.default_rng(0)
    k = _store(rng, B, s, bits, 32, kg, 1, zero=zero, d=16, channel_words=True)
    v = _store(rng, B, s, bits, 32, 1, 16, zero=zero, d=16, channel_words=True)
    with pytest.raises(Exception, match="key_prefetch=4 must divide the keys pass's 2 steps"):
        da.quantized_decode_partials(jnp.ones((B, K, g, 16)), k, v, jnp.ones((B, s), bool), length, scale=0.25,
                                     interpret=True, path="cw2", cw2=da.Cw2Config(key_prefetch=4))
    # head_dim 24: 3 steps of 8 channel rows, so the default takes 1 step ahead (the depth-1 run above)
    assert [da.key_prefetch_of(da.Cw2Config(), d) for d in (24, 128)] == [1, 2]


# The values pass on Hopper's tensor cores (`Cw2Config(values="wgmma")`, kv_values_wgmma). Mosaic GPU
# has no CPU interpreter: interpret mode runs `emulate_values`, the kernel's arithmetic in plain JAX
# with the codes at the logical columns the hardware's fragment gives them (`crumb_permutation`) and
# B written where `b_column` says, so a wrong index map fails here. Llama-2's one query a kv head,
# 4 queries (one program takes them all) with symmetric values, head_dim 64 with 3 queries.
# All with `values_balanced` (the default: codes centred on their middle, the zero-point term to match;
# on the symmetric store it adds a term of its own), and run 24's codes less 2 on an asymmetric one.
WGMMA_VALUE_CASES = [  # G, head_dim, capacity, length, value zero points, splits, balanced (the default)
    (1, 128, 1024, 700, True, 2, True), (4, 128, 1024, 1000, False, None, True), (3, 64, 2048, 1500, True, 3, True),
    (1, 128, 1024, 700, True, 2, False)]


@pytest.mark.parametrize("g,d,s,length,zero,splits,balanced", WGMMA_VALUE_CASES,
                         ids=[f"g{c[0]}-d{c[1]}-{'asym' if c[4] else 'sym'}{'' if c[6] else '-less-2'}"
                              for c in WGMMA_VALUE_CASES])
def test_wgmma_values_model_equals_reference(g, d, s, length, zero, splits, balanced):
    rng = np.random.default_rng(g + d)
    k = _store(rng, B, s, 2, 32, 32, 1, d=d, channel_words=True)
    v = _store(rng, B, s, 2, 32, 1, 32, zero=zero, d=d, channel_words=True)
    q = jnp.asarray(rng.normal(size=(B, K, g, d)).astype(np.float32))
    mask = jnp.asarray(rng.random((B, s)) < 0.8)
    ref = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=d ** -0.5)])
    out = da.combine([da.quantized_decode_partials(q, k, v, mask, jnp.int32(length), scale=d ** -0.5,
                                                   num_splits=splits, interpret=True, path="cw2",
                                                   cw2=da.Cw2Config(values="wgmma", values_balanced=balanced))])
    top = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=CW_TOLERANCE["cw2"](2) * top)


def test_values_top_is_the_largest_overlapping_keys_split():
    """A hand-checked case: 7 blocks, keys splits of 3 ([0-2], [3-5], [6]) with maxima 5, 9, 2; values
    splits of 2 blocks overlap keys splits {0}, {0, 1}, {1}, {2}; one of 7 blocks overlaps all three."""
    top = jnp.asarray([5.0, 9.0, 2.0]).reshape(1, 1, 3, 1)
    np.testing.assert_array_equal(np.asarray(da.values_top(top, 7, 3, 2)).ravel(), [5.0, 9.0, 9.0, 2.0])
    np.testing.assert_array_equal(np.asarray(da.values_top(top, 7, 3, 7)).ravel(), [9.0])
    assert da.values_top(top, 7, 3, 3) is top


def test_value_blocks_spread_a_wave():
    """The values pass's blocks a split: the heads' blocks over VALUE_SLOTS = 264 programs, rounded.
    Llama-2-7B at 32k (16 blocks): batch 1 (32 heads) 2 blocks, 8 splits; batch 8 (256) all 16, one
    split; a decode loop's 17 blocks at batch 1, 2 (9 splits); a named split count wins."""
    assert da.VALUE_SLOTS == 264
    assert [da._value_blocks(p, n, None) for p, n in ((32, 16), (32, 17), (256, 16), (64, 16), (4, 8))] == [2, 2, 16, 4, 1]
    assert da._value_blocks(32, 16, 3) == 6 and da._value_blocks(256, 16, 16) == 1


@pytest.mark.parametrize("splits,values_splits,want", [(3, 1, 1), (2, 8, 8), (8, 3, 3), (None, None, 8)])
def test_wgmma_values_splits_apart_from_the_keys_pass(splits, values_splits, want):
    """The values pass in splits of its own (`Cw2Config.values_splits`): 8 blocks of 512 tokens, keys
    splits of 3, 2 and 8 blocks against values splits that cut across them; unnamed, one wave of
    VALUE_SLOTS programs (here 8 splits of a block). Equal to the reference to cw2's bound, and to the
    values pass in the keys pass's splits up to p x scale's one fp16 rounding against another maximum
    (2**-11). The keys come from the int8 keys pass's CPU model, plain JAX, 10x faster here than the
    f16x2 pass's interpret mode; the split maxima it hands on are the same kind (the GPU tests run the
    f16x2 pass with the values pass's own splits)."""
    rng = np.random.default_rng(7)
    s, length = 4096, 3900
    k = _store(rng, B, s, 2, 32, 32, 1, d=128, channel_words=True)
    v = _store(rng, B, s, 2, 32, 1, 32, d=128, channel_words=True)
    q = jnp.asarray(rng.normal(size=(B, K, 1, 128)).astype(np.float32))
    mask = jnp.asarray(rng.random((B, s)) < 0.9)
    ref = da.combine([da.quantized_decode_reference(q, k, v, mask, length, scale=128 ** -0.5)])

    def attend(values_splits):
        config = da.Cw2Config(values="wgmma", columns=32, values_splits=values_splits, keys="int8")
        return da.quantized_decode_partials(q, k, v, mask, jnp.int32(length), scale=128 ** -0.5, num_splits=splits,
                                            interpret=True, path="cw2", cw2=config, merge=False)

    part = attend(values_splits)
    assert part.o.shape[2] == want  # 3 splits of 8 blocks: 3, 3 and 2
    out, top = da.combine([part]), float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=CW_TOLERANCE["cw2"](2) * top)
    if values_splits:
        together = da.combine([attend(None)])
        np.testing.assert_allclose(np.asarray(out), np.asarray(together), rtol=0, atol=2 ** -11 * top)


def test_wgmma_values_index_map_is_the_fragment_order():
    """`b_column`, where B takes token (word column j, slot i) of a step, is the logical column the
    2-bit fragment gives that code (`crumb_permutation`, chunk by chunk of 4 word columns); the
    conversion's pairs, in `h2_positions` order, are slots (c, c + 8) less 2, exactly, or with balanced
    mids less `slot_mids(True)`: 1.5 (a half fp16 holds at offsets >= 2), 2 and 1 for slots 0 and 8."""
    from pallas_kernels.f16x2 import H2_SHIFT, h2_codes, h2_pair_constants, h2_positions, h2_unpack
    from pallas_kernels.kv_values_wgmma import b_column, slot_mids
    from pallas_kernels.wgmma_matmul import crumb_permutation

    perm = crumb_permutation()
    for j in range(16):
        for i in range(16):
            assert b_column(i, j) == 64 * (j // 4) + perm[16 * (j % 4) + i]
    assert sorted(b_column(i, j) for i in range(16) for j in range(16)) == list(range(256))
    codes = np.random.default_rng(0).integers(0, 4, size=(64, 16))
    words = jnp.asarray((codes << (2 * np.arange(16))).sum(1).astype(np.uint32).view(np.int32))
    np.testing.assert_array_equal(slot_mids(), [2.0] * 16)
    np.testing.assert_array_equal(slot_mids(balanced=True), [2.0] + [1.5] * 7 + [1.0] + [1.5] * 7)
    for balanced in (False, True):
        mids = slot_mids(balanced)
        for c, (shifted, o) in enumerate(h2_positions(2)):
            halves = h2_unpack(h2_codes(jnp.right_shift(words, H2_SHIFT) if shifted else words,
                                        *h2_pair_constants(2, o, balanced=balanced), asm=False), asm=False)
            np.testing.assert_array_equal(halves[0], codes[:, c] - mids[c])
            np.testing.assert_array_equal(halves[1], codes[:, c + 8] - mids[c + 8])


@pytest.mark.parametrize("g,options", [(1, {}), (4, {}), (1, dict(values_pieces=1, values_lop3=False, values_stages=4)),
                                       (1, dict(values_balanced=False))],
                         ids=["g1", "g4", "g1-256-arith", "g1-less-2"])
def test_wgmma_values_pass_lowers_for_cuda(g, options):
    """The Mosaic GPU values pass traces and lowers for CUDA beside cw2's Triton keys pass: one
    kernel of each, for one query a kv head and for 4 (one program takes them all), in the default
    steps of 512 tokens with the conversion's and-or as PTX lop3 and in run 21's 256-token steps with
    arith's and + or; with the codes less 2 (not centred on their middle)."""
    from jax import export

    rng = np.random.default_rng(2)
    s, d = 4096, 128
    k = _store(rng, 1, s, 2, 32, 32, 1, d=d, channel_words=True)
    v = _store(rng, 1, s, 2, 32, 1, 32, d=d, channel_words=True)
    fn = jax.jit(lambda q, k, v, m: da.quantized_decode_partials(q, k, v, m, 3001, scale=SCALE, path="cw2",
                                                                 cw2=da.Cw2Config(values="wgmma", **options)))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=["cuda"], disabled_checks=checks)(
        jnp.zeros((1, K, g, d), jnp.bfloat16), k, v, jnp.ones((1, s), bool)).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1


def test_values_pass_choice_and_errors(monkeypatch):
    """"auto" takes the tensor-core values pass on a Hopper GPU only, and with one query a kv head on
    large grids only; stores it cannot read and unknown passes are clear errors."""
    from pallas_kernels import wgmma_matmul

    rng = np.random.default_rng(3)
    v2 = _store(rng, B, 1024, 2, 32, 1, 32, d=128, channel_words=True)
    v4 = _store(rng, B, 1024, 4, 32, 1, 32, d=128, channel_words=True)
    auto = da.Cw2Config()
    assert da.values_pass_of(auto, v2, 4, interpret=False, block=2048) == "cuda"  # no Hopper GPU here
    monkeypatch.setattr(wgmma_matmul, "hopper_is_default_device", lambda: True)
    assert da.values_pass_of(auto, v2, 4, interpret=False, block=2048) == "wgmma"
    assert da.values_pass_of(auto, v2, 1, interpret=False, block=2048) == "wgmma"  # one query a kv head too (run 22)
    # ... but not on a small grid, where a decode step measured slower with it (run 26): batch 1 of
    # Llama-2's 32 kv heads takes the f16x2 pass, batch 8 the tensor cores; grouped queries keep them
    assert [da.values_pass_of(auto, v2, 1, interpret=False, block=2048, small_grid=s) for s in (True, False)] == \
        ["cuda", "wgmma"]
    assert da.values_pass_of(auto, v2, 4, interpret=False, block=2048, small_grid=True) == "wgmma"
    assert da.values_pass_of(da.Cw2Config(values="wgmma"), v2, 1, interpret=False, block=2048, small_grid=True) == "wgmma"
    assert da.values_pass_of(auto, v2, 8, interpret=False, block=2048) == "cuda"  # 8 x 4 columns: more sums than it holds
    assert da.values_pass_of(auto, v2, 4, interpret=True, block=2048) == "cuda"
    assert da.values_pass_of(auto, v4, 4, interpret=False, block=2048) == "cuda"
    # keys-pass blocks of 256 tokens are not whole 512-token steps; one-piece steps take them
    assert da.values_pass_of(auto, v2, 1, interpret=False, block=256) == "cuda"
    assert da.values_pass_of(da.Cw2Config(values_pieces=1), v2, 1, interpret=False, block=256) == "wgmma"
    with pytest.raises(Exception, match="Cw2Config.values='tc' must be one of"):
        da.Cw2Config(values="tc")
    with pytest.raises(Exception, match="values_pieces=3 must be 1 or 2"):
        da.Cw2Config(values_pieces=3)
    from pallas_kernels.kv_values_wgmma import supports
    v16 = _store(rng, B, 1024, 2, 16, 1, 32, d=128, channel_words=True)  # code-order tiles of 16 word columns
    v16 = dataclasses.replace(v16, rows=16)
    assert supports(v16, 1) is None and "not whole steps of 32" in supports(v16, 1, pieces=2)
    k4 = _store(rng, B, 1024, 4, 32, 32, 1, d=128, channel_words=True)
    with pytest.raises(Exception, match="values='wgmma'.*4-bit channel_words.*2-bit"):
        da.quantized_decode_partials(jnp.ones((B, K, 1, 128)), k4, v4, jnp.ones((B, 1024), bool), 1000, scale=0.1,
                                     interpret=True, path="cw2", cw2=da.Cw2Config(values="wgmma"))
