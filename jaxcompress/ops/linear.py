"""`linear(x, w)`: the one dispatch every projection goes through.

The model never knows which recipe produced a weight. A dense weight is a `[in, out]` array;
compressed weights are pytree leaves of their own type (QArray, sparse, factorized, LoRA) and
register the function that multiplies by them:

    @register_linear(MyLeaf)
    def _my_linear(x, w: MyLeaf) -> jax.Array: ...

A leaf type without a registered path but with a `dequantize()` method falls back to
dequantize-then-matmul, which is correct everywhere and fast nowhere.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LinearFn = Callable[[jax.Array, Any], jax.Array]
_PATHS: dict[type, LinearFn] = {}


def register_linear(leaf_type: type) -> Callable[[LinearFn], LinearFn]:
    """Registers `fn(x, w) -> y` as the matmul for weights of `leaf_type`."""

    def decorator(fn: LinearFn) -> LinearFn:
        _PATHS[leaf_type] = fn
        return fn

    return decorator


def dense_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] in x's dtype.

    A plain dot: XLA accumulates bf16 products in fp32 anyway, while asking for an fp32 result
    and casting back made batch-1 decode GEMVs 27% slower on an H200 (scripts/decode_probe.py).
    """
    return jnp.dot(x, w.astype(x.dtype))


def linear(x: jax.Array, w: Any) -> jax.Array:
    """y [..., out] = x [..., in] @ W, W given by a dense array or any registered leaf type."""
    for cls in type(w).__mro__:
        fn = _PATHS.get(cls)
        if fn is not None:
            return fn(x, w)
    if hasattr(w, "dequantize"):
        return dense_linear(x, w.dequantize())
    return dense_linear(x, w)


def dense_weight(w: Any) -> jax.Array:
    """The dense `[in, out]` matrix a weight leaf stands for (the reference semantics)."""
    return w.dequantize() if hasattr(w, "dequantize") else w
