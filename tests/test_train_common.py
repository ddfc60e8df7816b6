"""Shared helpers of the training tests (no tests here).

Random models are filled from a seeded numpy generator instead of `random_model`: the weights
are the same kind (N(0, 0.02), norms 1) but nothing has to compile, which keeps these tests fast
on the CPU.
"""

import jax
import numpy as np
from flax import nnx

from jaxcompress.models.build import abstract_model, model_from_tensors, path_str
from jaxcompress.models.presets import preset

TINY1 = preset("tiny").replace(num_layers=1)  # one decoder layer: half the compile time


def numpy_model(cfg=TINY1, seed=0, dtype=np.float32, compute_dtype=None):
    """LlamaModel with N(0, 0.02) weights (norm scales 1) drawn by numpy from `seed`, stored in
    `dtype`, computing in `compute_dtype` (default: dtype)."""
    rng = np.random.default_rng(seed)
    _, state = nnx.split(abstract_model(cfg))
    tensors = []
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        value = np.ones(shape, np.float32) if path[-1] == "scale" else 0.02 * rng.standard_normal(shape)
        tensors.append((path, value.astype(np.float32), "numpy"))
    return model_from_tensors(cfg, tensors, param_dtype=dtype, dtype=compute_dtype)


def pure_tree(model):
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


_FORWARD = {}


def logits(graphdef, tree, tokens):
    """fp32 logits of the model with parameters `tree` (one compiled program per tree layout)."""
    if graphdef not in _FORWARD:
        _FORWARD[graphdef] = jax.jit(lambda t, x: nnx.merge(graphdef, t)(x)[0])
    return np.asarray(_FORWARD[graphdef](tree, tokens))


def name_of(path) -> str:
    return path_str(path)
