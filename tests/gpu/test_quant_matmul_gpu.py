"""The fused low-bit matmul kernels compiled for a real GPU (skipped without one).

Run on the GPU machine from the repository root:

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m pytest -q tests/gpu/test_quant_matmul_gpu.py

The same checks as the CPU interpret-mode tests, at Llama-7B shapes and on every code path the
autotuner may pick (GEMV, per-slab and whole-tile tensor-core dots, split-K, int8): fresh
random inputs, NaN-poisoned outputs, relative error against the reference at most 1e-2, never
NaN. `scripts/bench_kernels.py` also checks each timed config against the reference.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (set JAX_PLATFORMS=cuda)")]

from jaxcompress.ops.linear import linear  # noqa: E402
from pallas_kernels import autotune  # noqa: E402
from pallas_kernels.int8_matmul import int8_layout, int8_matmul, int8_matmul_reference  # noqa: E402
from pallas_kernels.layout import kernel_layout  # noqa: E402
from pallas_kernels.quant_matmul import default_config, quant_matmul, quant_matmul_reference  # noqa: E402
from pallas_kernels.testing import Variant, float64_reference, random_weight, relative_error  # noqa: E402

TOL = 1e-2
NAN = float("nan")

# (variant, K, N, batches)
CASES = [
    (Variant(4, 128), 4096, 4096, (1, 5, 16, 64, 256)),
    (Variant(4, 128, "asym"), 11008, 4096, (1, 16)),
    (Variant(8, 0), 4096, 1024, (1, 16)),
    (Variant(3, 128), 4096, 1024, (1, 4)),
    (Variant(2, 128), 4096, 1024, (1, 4)),
    (Variant(4, 32, "asym", tiled_rows=32), 4096, 1024, (1, 16)),
    (Variant(3, 128, tiled_rows=32), 11008, 1024, (1, 16)),  # K padded to the tile
    (Variant(4, 0, "lut"), 4096, 1024, (1, 16)),
    (Variant(4, 128, "lut_scaled"), 4096, 1024, (16,)),
    (Variant(4, 128, act_order=True, outliers=500), 4096, 1024, (2,)),
]


def _check(y, x, w, reference):
    y32 = np.asarray(jnp.asarray(y, jnp.float32))
    assert not np.isnan(y32).any(), "an output element was never written (or a NaN was computed)"
    assert relative_error(y, reference(x, w)) <= TOL


def one_config_per_path(configs):
    """The first config of each code path (GEMV with each dequantization, with or without the
    loads a step ahead / per-slab dot / whole-tile dot, with or without split-K, even or not)."""
    seen, out = set(), []
    for cfg in configs:
        path = (cfg.use_dot, cfg.tile_dot, cfg.split_k > 1, cfg.dequant, cfg.prefetch)
        if path not in seen:
            seen.add(path)
            out.append(cfg)
    return out


@pytest.mark.parametrize("case", [(Variant(8, 0), 4096, 4096), (Variant(4, 128, "asym", tiled_rows=32), 4096, 1024)],
                         ids=["w8a8", "w4a8"])
def test_int8_kernel_candidates(case):
    v, k, n = case
    w = random_weight(1, k, n, v)
    lay = int8_layout(w)
    for m in (16, 64, 256):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        for cfg in one_config_per_path(autotune.candidates(lay, m, int8=True)):
            _check(int8_matmul(x, w, config=cfg, poison=NAN), x, w, int8_matmul_reference)


def test_fp16_activations():
    w = random_weight(2, 4096, 4096, Variant(4, 128))
    x = jax.random.normal(jax.random.key(3), (16, 4096), jnp.float32).astype(jnp.float16)
    for m in (1, 16):
        lay = kernel_layout(w)
        y = quant_matmul(x[:m], w, config=autotune.candidates(lay, m)[0], poison=NAN)
        assert y.dtype == jnp.float16
        _check(y, x[:m], w, quant_matmul_reference)


@pytest.mark.parametrize("variant", [Variant(4, 128), Variant(4, 128, "asym"), Variant(2, 128), Variant(8, 0)],
                         ids=lambda v: v.name)
def test_h2_paired_fp16_on_gpu(variant):
    """dequant="h2" runs the f16x2 inline PTX: against the fp32 "fma" path and the float64
    product, at activations of ordinary size, 3e4 and 1e-5 (the power-of-two scaling of x)."""
    w = random_weight(5, 4096, 1024, variant)
    x0 = jax.random.normal(jax.random.key(7), (2, 4096), jnp.float32)
    lay = kernel_layout(w)
    h2 = [c for c in autotune.candidates(lay, 2) if c.dequant == "h2"]
    assert {c.prefetch for c in h2} == {False, True}
    fma = dataclasses.replace(h2[0], dequant="fma", prefetch=False)
    for mult in (1.0, 3e4, 1e-5):
        x = (x0 * mult).astype(jnp.bfloat16)
        ref = float64_reference(x, w)
        err_fma = relative_error(quant_matmul(x, w, config=fma), ref)
        for cfg in h2[:2] + [c for c in h2 if c.prefetch][:1]:
            y = quant_matmul(x, w, config=cfg, poison=NAN)
            assert not np.isnan(np.asarray(y, np.float32)).any()
            assert relative_error(y, ref) <= max(1.1 * err_fma, 2e-3), (mult, cfg)


def test_linear_picks_the_kernel_on_gpu():
    """linear() on a QArray lowers to the Pallas kernel at decode batch sizes, with the right values."""
    w = random_weight(4, 4096, 11008, Variant(4, 128))
    for m in (1, 8):
        x = jax.random.normal(jax.random.key(5), (m, 4096), jnp.float32).astype(jnp.bfloat16)
        hlo = jax.jit(linear).lower(x, w).as_text()
        assert "quant_matmul_w4" in hlo, "linear() did not dispatch to the fused kernel"
        _check(jax.jit(linear)(x, w), x, w, quant_matmul_reference)


# Last: the longest test (one compile per code path, shape and batch); a time cap cuts it, not the others.
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}x{c[2]}")
def test_every_code_path(case):
    v, k, n, batches = case
    w = random_weight(k + n, k, n, v)
    lay = kernel_layout(w)
    ref = jax.jit(quant_matmul_reference)
    for m in batches:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        for cfg in one_config_per_path(autotune.candidates(lay, m) + [default_config(lay, m)]):
            y = quant_matmul(x, w, config=cfg, poison=NAN)
            _check(y, x, w, ref)
        assert relative_error(y, float64_reference(x, w)) <= TOL
