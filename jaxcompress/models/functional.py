"""Jitting NNX models as pure functions: split once, merge inside the traced function.

`jit_apply(model, fn)` returns a callable `(*args) -> fn(model, *args)` compiled with
`jax.jit`, where the model's state is an ordinary (donation-free) argument. Compiled functions
are cached per argument shapes by jax itself, so bucketing inputs to a few shapes keeps
compilation to a few programs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def jit_apply(model, fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
    graphdef, state = nnx.split(model)

    def pure(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    compiled = jax.jit(pure, **jit_kwargs)
    return lambda *args: compiled(state, *args)
