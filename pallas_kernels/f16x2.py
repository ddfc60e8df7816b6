"""Paired fp16 arithmetic (f16x2) for the Pallas-Triton kernels: one 32-bit register holds two
fp16 values and one instruction works on both, through inline PTX
(`pallas.triton.elementwise_inline_asm`).

Low-bit codes become fp16 values without an int -> float conversion: a word's code pair (one
code in each half-word, at the same offset o) masked where it lies and OR-ed into the mantissa
of 2**(10 - o) is the f16x2 pair `2**(10 - o) + code`; one f16x2 subtraction of
`2**(10 - o) + 2**(bits - 1)` (the *centre*) leaves the exact centred codes `code - 2**(bits-1)`.
A code fits when o + bits <= 10 (fp16 has 10 mantissa bits); the pairs above are read from
`word >> H2_SHIFT`. Two kernels build on this: the KV decode bodies "cw16" / "cw2"
(`decode_attention.py`) and the "h2" GEMV of the weight matmul (`quant_matmul.py`).

Every helper takes `asm`: True emits the PTX (GPU), False runs the same arithmetic through jnp
on fp16 values (interpret mode on the CPU, which cannot execute PTX), with the same roundings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

H2_SHIFT = 8          # the top code pairs of a word are read from word >> 8
H2_MANTISSA = 10      # fp16 mantissa bits: a code at offset o fits when o + bits <= 10


def h2_positions(bits: int) -> list[tuple[bool, int]]:
    """[(read from word >> H2_SHIFT?, offset in each half-word)] of the code pairs of a word."""
    offs = [j * bits for j in range(16 // bits)]
    return [(False, o) if o + bits <= H2_MANTISSA else (True, o - H2_SHIFT) for o in offs]


# On the GPU f16x2 values travel as int32 arrays (Triton's inline assembly takes signless integers).
# In interpret mode a helper's f16x2 result is the pair (low, high) of fp32 arrays that hold fp16
# values: the same roundings as packed words, without packing and unpacking the bits at every step.
# Interpret mode lowers and compiles the kernels op by op, so that matters: cw2 at head_dim 128 took
# 17.1 s instead of 22.7 on the CPU. The helpers take either form: int32 words (codes and meta read
# from memory, constants) or such a pair.
def _h2_halves(x):
    """f16x2 -> (low, high) as fp32 (interpret mode): int32 words, or a helper's (low, high) pair."""
    if isinstance(x, tuple):
        return x
    u = lax.bitcast_convert_type(x, jnp.uint32)
    half = lambda h: lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16).astype(jnp.float32)  # noqa: E731
    return half(u & 0xFFFF), half(u >> 16)


def _h2_join(low, high):
    """Two fp32 arrays -> interpret mode's f16x2 value: each rounded to the nearest fp16."""
    return low.astype(jnp.float16).astype(jnp.float32), high.astype(jnp.float16).astype(jnp.float32)


def h2_zeros(shape, asm: bool):
    """f16x2 zeros (0, 0) of `shape`: int32 words on the GPU, interpret mode's pair otherwise."""
    if asm:
        return jnp.zeros(shape, jnp.int32)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def h2_pack(low, high, asm: bool):
    """fp32 low and high halves -> f16x2 words (cvt.rn.f16x2.f32 puts its first operand high)."""
    if not asm:
        return _h2_join(low, high)
    (out,) = inline_ptx("cvt.rn.f16x2.f32 $0, $1, $2;", [high, low], "=r,f,f", [jnp.int32])
    return out


def h2_unpack(x, asm: bool):
    """f16x2 words -> (low, high) fp32."""
    if not asm:
        return _h2_halves(x)
    # one result an instruction block: Pallas lowers inline assembly with a single result
    return tuple(inline_ptx(f"{{ .reg .b16 lo, hi; mov.b32 {{lo, hi}}, $1; cvt.f32.f16 $0, {half}; }}",
                            [x], "=f,r", [jnp.float32])[0] for half in ("lo", "hi"))


def h2_code_fma(words, mask, magic, center, factor, acc, asm: bool):
    """acc + factor * (codes - mid), all f16x2: the code pair of `words` under `mask` OR-ed into
    `magic`, less `center` (see `h2_pair_constants`)."""
    if not asm:
        f_lo, f_hi = _h2_halves((words & mask) | magic)
        e_lo, e_hi = _h2_halves(center)
        s_lo, s_hi = _h2_halves(factor)
        a_lo, a_hi = _h2_halves(acc)
        return _h2_join(s_lo * (f_lo - e_lo) + a_lo, s_hi * (f_hi - e_hi) + a_hi)
    (out,) = inline_ptx("{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; sub.f16x2 t, t, $4; "
                        "fma.rn.f16x2 $0, $5, t, $6; }",
                        [words, mask, magic, center, factor, acc], "=r,r,r,r,r,r,r", [jnp.int32])
    return out


def h2_join(low, high, asm: bool):
    """Two fp16 arrays -> f16x2 words (no rounding: a register move)."""
    if not asm:
        return _h2_join(low.astype(jnp.float32), high.astype(jnp.float32))
    (out,) = inline_ptx("mov.b32 $0, {$1, $2};", [low, high], "=r,h,h", [jnp.int32])
    return out


def h2_fma(a, b, c, asm: bool):
    """a * b + c on f16x2 words."""
    if not asm:
        (a_lo, a_hi), (b_lo, b_hi), (c_lo, c_hi) = _h2_halves(a), _h2_halves(b), _h2_halves(c)
        return _h2_join(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi)
    (out,) = inline_ptx("fma.rn.f16x2 $0, $1, $2, $3;", [a, b, c], "=r,r,r,r", [jnp.int32])
    return out


def h2_mul(a, b, asm: bool):
    """a * b on f16x2 words."""
    if not asm:
        (a_lo, a_hi), (b_lo, b_hi) = _h2_halves(a), _h2_halves(b)
        return _h2_join(a_lo * b_lo, a_hi * b_hi)
    (out,) = inline_ptx("mul.rn.f16x2 $0, $1, $2;", [a, b], "=r,r,r", [jnp.int32])
    return out


def inline_ptx(asm: str, args: list, constraints: str, dtypes: list) -> list:
    """Elementwise inline PTX over same-shape arrays (scalars are broadcast)."""
    from jax.experimental.pallas import triton as plgpu  # imported late: GPU-only module

    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    args = [jnp.broadcast_to(a, shape) for a in args]
    return plgpu.elementwise_inline_asm(asm, args=args, constraints=constraints, pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, t) for t in dtypes])


def h2_pair_constants(bits: int, o, balanced: bool = False):
    """(mask, magic, centre) f16x2 words of the code pair at offset o of each half-word: centre is
    magic's value 2**(10 - o) plus the mid code 2**(bits - 1), or with `balanced` plus
    `balanced_mids(bits, o)` (o a Python int then)."""
    field = jnp.int32((1 << bits) - 1) << o
    e = (25 - o) << 10  # fp16 exponent word of 2**(10 - o)
    magic = e | (e << 16)
    if balanced:  # each half's mid in mantissa units: bit o is 1, bit o - 1 is 1/2
        lo, hi = (int(m * (1 << o)) for m in balanced_mids(bits, o))
        return field | (field << 16), magic, magic | jnp.int32(lo) | (jnp.int32(hi) << 16)
    mid = jnp.int32(1 << (bits - 1)) << o  # the mid code, in the mantissa
    return field | (field << 16), magic, magic | mid | (mid << 16)


def balanced_mids(bits: int, o: int) -> tuple[float, float]:
    """(low half, high half) mids a *balanced* pair at offset o subtracts: the codes' middle
    2**(bits - 1) - 1/2 where fp16 holds it (o >= 1: the unit of 2**(10 - o) is at most 1/2), else
    2**(bits - 1) and 2**(bits - 1) - 1, the middle on average over the pair. Uniform codes less these
    sum to about zero, so a sum of weights times them has no part that grows with the count."""
    mid = 1 << (bits - 1)
    return (mid - 0.5, mid - 0.5) if o >= 1 else (float(mid), float(mid - 1))


def h2_codes(words, mask, magic, center, asm: bool):
    """The centred code pair `code - 2**(bits - 1)` of `words` under `mask` as f16x2 (exact):
    masked, OR-ed into `magic`, less `center` (see `h2_pair_constants`)."""
    if not asm:
        f_lo, f_hi = _h2_halves((words & mask) | magic)
        e_lo, e_hi = _h2_halves(center)
        return _h2_join(f_lo - e_lo, f_hi - e_hi)
    (out,) = inline_ptx("{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; sub.f16x2 $0, t, $4; }",
                         [words, mask, magic, center], "=r,r,r,r,r", [jnp.int32])
    return out


def h2_sum_halves(x, asm: bool):
    """low + high of f16x2 words, added in fp16 (one rounding), as fp32."""
    if not asm:
        lo, hi = _h2_halves(x)
        return (lo + hi).astype(jnp.float16).astype(jnp.float32)
    (out,) = inline_ptx("{ .reg .b16 lo, hi, s; mov.b32 {lo, hi}, $1; add.rn.f16 s, lo, hi; "
                         "cvt.f32.f16 $0, s; }", [x], "=f,r", [jnp.float32])
    return out
