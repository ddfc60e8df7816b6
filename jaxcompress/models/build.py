"""Building models: abstract templates, filling them tensor by tensor, random init on device."""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import CheckpointError
from jaxcompress.models.config import ModelConfig
from jaxcompress.models.llama import INIT_STD, LlamaModel

Path = tuple  # a parameter path such as ('layers', 3, 'self_attn', 'q_proj', 'kernel')


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig, param_dtype=jnp.float32, dtype=None) -> LlamaModel:
    """The model with `ShapeDtypeStruct` leaves: shapes and names, no memory."""
    return nnx.eval_shape(lambda: LlamaModel(cfg, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0)))


def model_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[Path, np.ndarray, str]],
                       param_dtype=jnp.float32, dtype=None, sharding=None) -> LlamaModel:
    """Fills an abstract model from (path, host array, source) triples, one tensor at a time.

    Each tensor is checked against the template (name and shape), cast and placed on the
    device (with `sharding(path)` if given) before the next is read, so the host never holds
    more than one tensor. Raises `CheckpointError` naming the tensor and its source for an
    unknown name, a shape mismatch or a missing tensor; no partial model is returned.
    """
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype, dtype))
    slots = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    filled: set[Path] = set()
    for path, array, source in tensors:
        path = tuple(path)
        if path not in slots:
            raise CheckpointError(f"{source}: tensor {path_str(path)} has no place in the "
                                  f"{cfg.model_type} model (unexpected name)")
        want = slots[path].get_value()
        if tuple(array.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {path_str(path)} has shape {tuple(array.shape)}, "
                                  f"the config implies {tuple(want.shape)}")
        value = jnp.asarray(array, dtype=want.dtype)
        if sharding is not None:
            value = jax.device_put(value, sharding(path))
        slots[path].set_value(value)
        filled.add(path)
    missing = sorted(path_str(p) for p in slots if p not in filled)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors: {shown}")
    return nnx.merge(graphdef, state)


def random_model(cfg: ModelConfig, param_dtype=jnp.bfloat16, dtype=None, seed: int = 0,
                 sharding=None) -> LlamaModel:
    """A randomly initialised model created directly on the device (no host copy).

    Tensor by tensor, with one small compiled sampler per distinct shape: compiling the whole
    initialisation as one program takes minutes for a 7B model (XLA expands every tensor's
    random-bit generator). Matrices ~ N(0, 0.02^2), norm scales 1, biases 0, as in `LlamaModel`.
    """
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype, dtype))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        spec = var.get_value()
        out = sharding(tuple(path)) if sharding is not None else None
        if path[-1] == "scale":
            value = _filled(spec.shape, spec.dtype, 1.0, out)
        elif path[-1] == "bias":
            value = _filled(spec.shape, spec.dtype, 0.0, out)
        else:
            value = _normal_tensor(jax.random.fold_in(key, i), spec.shape, spec.dtype, out)
        var.set_value(value)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_tensor_jit(key, shape, dtype, out):
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _normal_tensor(key, shape, dtype, out_sharding):
    if out_sharding is None:
        return _normal_tensor_jit(key, tuple(shape), jnp.dtype(dtype), None)
    fn = jax.jit(lambda k: (INIT_STD * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                 out_shardings=out_sharding)
    return fn(key)


def _filled(shape, dtype, value, out_sharding):
    array = jnp.full(shape, value, dtype)
    return jax.device_put(array, out_sharding) if out_sharding is not None else array


def params(model: LlamaModel) -> nnx.State:
    """The parameter pytree (an `nnx.State`); transforms map over it with key paths."""
    return nnx.state(model, nnx.Param)


def with_params(model: LlamaModel, new_params: nnx.State) -> LlamaModel:
    """A new model with the given parameters (the input model is left unchanged)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, nnx.merge_state(state, new_params))


def flat_params(model_or_state) -> dict[Path, object]:
    """{path: leaf value} for every parameter; a compressed leaf is one value."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else params(model_or_state)
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_summary(model) -> dict:
    """Parameter count (logical weights) and storage bytes, in total and per storage dtype."""
    count, total = 0, 0
    by_dtype: dict[str, int] = {}
    for leaf in flat_params(model).values():
        if hasattr(leaf, "nbytes") and callable(leaf.nbytes):  # compressed leaf
            shape = getattr(leaf, "shape", None)
            count += int(np.prod(shape)) if shape else 0
            nbytes = leaf.nbytes()
            kind = type(leaf).__name__
        else:
            count += int(np.prod(leaf.shape))
            nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
            kind = jnp.dtype(leaf.dtype).name
        total += nbytes
        by_dtype[kind] = by_dtype.get(kind, 0) + nbytes
    return {"parameters": count, "bytes": total, "bytes_by_kind": by_dtype}
