"""Replacing parameter leaves by path: the plumbing of every pure transform."""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from jaxcompress.models.build import params, path_str, with_params


def map_params(state: nnx.State, fns: dict[str, Callable[[str, Any], Any]]) -> nnx.State:
    """A new parameter state where the leaf at each path in `fns` is `fns[path](path, leaf)`.

    Leaves are named by their path string (`layers.3.mlp.down_proj.kernel`); the input state
    is left unchanged. Leaves are transformed one at a time, so a transform's temporaries for
    one weight are freed before the next.
    """
    out = []
    for path, var in nnx.to_flat_state(state):
        name = path_str(path)
        fn = fns.get(name)
        out.append((path, var if fn is None else var.replace(fn(name, var.get_value()))))
    return nnx.from_flat_state(out)


def replace_leaves(model, new: dict[str, Any]):
    """A new model with the leaves at the given paths replaced (the input model unchanged)."""
    return with_params(model, map_params(params(model), {p: (lambda _, __, v=v: v) for p, v in new.items()}))
