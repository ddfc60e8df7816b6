"""LoRA as a pytree leaf: `W = base + (alpha / rank) * a @ b`, with `base` frozen.

`base` is whatever weight leaf the model had: a dense `[K, N]` array (LoRA) or a `QArray`
(QLoRA: the base stays quantized and its matmul keeps its own fast path). The adapters are
`a [K, r]` and `b [r, N]`; `b` starts at zero, so a freshly wrapped model computes exactly what
the base model computed. Which projections get adapters is a regex over parameter names
(`layers.3.self_attn.q_proj.kernel`), matched in full.

Everything here is a pure function over the parameter tree (`nnx.to_pure_dict` of the model's
state): `add_lora`, `merge_lora`, `unmerge_lora`, adapter import/export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import CheckpointError, ConfigError
from jaxcompress.ops.linear import dense_linear, dense_weight, linear, register_linear

Tree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    """A weight with a low-rank adapter. Invariant (what `dequantize()` returns):

        W [K, N] = dense(base) + (alpha / rank) * a [K, r] @ b [r, N]

    `dropout_key` is set only inside a training step (see `with_dropout_keys`); with it, the
    adapter branch sees `dropout(x)` as in the LoRA paper. It is None everywhere else.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    alpha: float = dataclasses.field(default=16.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def ndim(self) -> int:
        return 2

    def delta(self) -> jax.Array:
        """fp32 [K, N] low-rank update (alpha / rank) * a @ b."""
        return self.scaling * jnp.dot(self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                                      precision=jax.lax.Precision.HIGHEST)

    def dequantize(self) -> jax.Array:
        """The merged dense [K, N] weight, in the base weight's dtype."""
        base = dense_weight(self.base)
        return (base.astype(jnp.float32) + self.delta()).astype(base.dtype)

    def nbytes(self) -> int:
        base = self.base.nbytes() if hasattr(self.base, "nbytes") and callable(self.base.nbytes) \
            else int(self.base.size) * self.base.dtype.itemsize
        return base + sum(int(x.size) * x.dtype.itemsize for x in (self.a, self.b))


@jax.custom_vjp
def frozen_linear(x: jax.Array, w: Any) -> jax.Array:
    """linear(x, w) for a frozen compressed weight: the forward pass takes the weight's own path
    (a fused low-bit kernel where one runs), the backward pass g @ dense(w)^T, so no kernel
    needs a derivative. w gets a zero cotangent: it is frozen by contract."""
    return linear(x, w)


def _frozen_fwd(x, w):
    return linear(x, w), w


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _frozen_bwd(w, g):
    return dense_linear(g, dense_weight(w).T), jax.tree_util.tree_map(_zero_cotangent, w)


frozen_linear.defvjp(_frozen_fwd, _frozen_bwd)


@register_linear(LoRA)
def lora_linear(x: jax.Array, w: LoRA) -> jax.Array:
    """y = x @ base (through the base's own path) + scaling * dropout(x) @ a @ b."""
    y = frozen_linear(x, w.base) if hasattr(w.base, "dequantize") else linear(x, w.base)
    h = x
    if w.dropout_key is not None and w.dropout > 0:
        keep = jax.random.bernoulli(w.dropout_key, 1.0 - w.dropout, x.shape)
        h = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    z = dense_linear(dense_linear(h, w.a), w.b)
    return y + (w.scaling * z).astype(y.dtype)


def _register():
    from jaxcompress.io.checkpoint import register_leaf_type

    register_leaf_type(LoRA)


_register()


# ------------------------------------------------------------------------------ tree helpers
def key_name(path) -> str:
    """Dotted name of a key path: ('layers', 0, 'mlp', 'up_proj', 'kernel') -> layers.0.mlp.up_proj.kernel."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def is_weight_leaf(x) -> bool:
    """A whole weight: a dense array or a compressed dataclass leaf (not its fields)."""
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def named_weights(tree: Tree) -> dict[str, Any]:
    """{dotted name: weight leaf}, compressed leaves kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight_leaf)
    return {key_name(p): v for p, v in flat}


def map_weights(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
    """tree with each weight leaf replaced by fn(name, leaf) (compressed leaves kept whole)."""
    return jax.tree_util.tree_map_with_path(lambda p, v: fn(key_name(p), v), tree, is_leaf=is_weight_leaf)


def select(pattern: str | list[str], tree: Tree, what: str) -> list[str]:
    """Names of the projection kernels that `pattern` (one regex or a list) matches in full.

    Raises ConfigError when nothing matches or when a match is not a projection kernel; `what`
    names the config option in the message.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ConfigError(f"{what}: invalid regex ({e})") from None
    names = named_weights(tree)
    hits = [n for n in names if any(c.fullmatch(n) for c in compiled)]
    if not hits:
        example = ", ".join(n for n in list(names)[:4])
        raise ConfigError(f"{what}={patterns!r} matches no parameter; names look like {example} "
                          f"(the regex must match the whole name)")
    bad = [n for n in hits if not n.endswith(".kernel")]
    if bad:
        raise ConfigError(f"{what}={patterns!r} matches {bad[0]}, which is not a projection kernel; "
                          f"only `...proj.kernel` weights go through linear() and can be wrapped")
    return hits


# ------------------------------------------------------------------------------ transforms
def add_lora(tree: Tree, targets: str | list[str], rank: int, alpha: float, key: jax.Array,
             dropout: float = 0.0, dtype=jnp.float32) -> Tree:
    """Wraps every kernel whose name matches `targets` in a `LoRA` (b = 0: the function is unchanged).

    `a` is drawn from U(-1/sqrt(K), 1/sqrt(K)) (PEFT's default, Kaiming-uniform with a = sqrt 5),
    each from its own key folded from `key` and the layer's index.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora.rank={rank!r} must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout={dropout} must be in [0, 1)")
    hits = set(select(targets, tree, "lora.targets"))
    order = {n: i for i, n in enumerate(sorted(hits))}

    def wrap(name, w):
        if name not in hits:
            return w
        if isinstance(w, LoRA):
            raise ConfigError(f"{name} already has a LoRA adapter")
        k, n = w.shape
        bound = 1.0 / np.sqrt(k)
        a = jax.random.uniform(jax.random.fold_in(key, order[name]), (k, rank), jnp.float32, -bound, bound)
        return LoRA(base=w, a=a.astype(dtype), b=jnp.zeros((rank, n), dtype), alpha=float(alpha),
                    dropout=float(dropout))

    return map_weights(wrap, tree)


def with_dropout_keys(tree: Tree, key: jax.Array) -> Tree:
    """Gives each LoRA leaf with dropout > 0 its own key for this step."""
    counter = iter(range(1 << 30))

    def set_key(_, w):
        if isinstance(w, LoRA) and w.dropout > 0:
            return dataclasses.replace(w, dropout_key=jax.random.fold_in(key, next(counter)))
        return w

    return map_weights(set_key, tree)


def merge_lora(tree: Tree, requantize: Callable[[jax.Array, Any], Any] | None = None) -> Tree:
    """Folds every adapter into its weight: a dense weight in the base's dtype.

    With `requantize(w_fp32 [K, N], base) -> leaf`, a quantized base is re-quantized after the
    merge (e.g. `qat.requantize_like`); without it a QLoRA weight merges to dense.
    """
    return map_weights(lambda _, w: _merge_one(w, requantize) if isinstance(w, LoRA) else w, tree)


@functools.partial(jax.jit, static_argnums=1)
def _merge_one(w: LoRA, requantize) -> Any:
    if requantize is not None and hasattr(w.base, "dequantize"):
        return requantize(dense_weight(w.base).astype(jnp.float32) + w.delta(), w.base)
    return w.dequantize()


def unmerge_lora(merged: Tree, adapters: Tree) -> Tree:
    """Inverse of `merge_lora` for dense bases: rebuilds LoRA(base = W - delta, a, b).

    `adapters` is the tree that holds the LoRA leaves (only their a, b, alpha are used).
    """
    lora = {n: w for n, w in named_weights(adapters).items() if isinstance(w, LoRA)}

    def unmerge(name, w):
        if name not in lora:
            return w
        if hasattr(w, "dequantize"):
            raise ConfigError(f"{name}: cannot unmerge from a quantized weight (re-quantization is lossy); "
                              f"keep the adapters separate instead")
        ad = lora[name]
        base = (w.astype(jnp.float32) - ad.delta()).astype(w.dtype)
        return dataclasses.replace(ad, base=base, dropout_key=None)

    return map_weights(unmerge, merged)


def lora_count(tree: Tree) -> int:
    return sum(isinstance(w, LoRA) for w in named_weights(tree).values())


# ------------------------------------------------------------------------------ adapters on disk
# PEFT's layout: adapter_config.json + adapter_model.safetensors with
# base_model.model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r].
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_prefix(name: str) -> str:
    module = name[: -len(".kernel")]
    return f"base_model.model.model.{module}"


def save_adapters(tree: Tree, folder: str, base_model: str = "") -> None:
    """Writes the adapters (not the base) in PEFT's file layout, atomically."""
    from safetensors.numpy import save_file

    from jaxcompress.io.atomic import atomic_dir

    lora = {n: w for n, w in named_weights(tree).items() if isinstance(w, LoRA)}
    if not lora:
        raise ConfigError("the model has no LoRA adapters to save")
    first = next(iter(lora.values()))
    tensors = {}
    for name, w in lora.items():
        tensors[_peft_prefix(name) + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(w.a, np.float32).T)
        tensors[_peft_prefix(name) + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(w.b, np.float32).T)
    modules = sorted({n.split(".")[-2] for n in lora})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
              "lora_dropout": first.dropout, "target_modules": modules, "bias": "none",
              "base_model_name_or_path": base_model,
              "rank_pattern": {_peft_prefix(n)[len("base_model.model.model."):]: w.rank
                               for n, w in lora.items() if w.rank != first.rank},
              "alpha_pattern": {_peft_prefix(n)[len("base_model.model.model."):]: w.alpha
                                for n, w in lora.items() if w.alpha != first.alpha}}
    with atomic_dir(folder) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=1)


def load_adapters(tree: Tree, folder: str) -> Tree:
    """Wraps the weights of `tree` with the adapters saved in `folder` (PEFT layout)."""
    from safetensors.numpy import load_file

    cfg_path, w_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise CheckpointError(f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        config = json.load(f)
    tensors = load_file(w_path)
    used = set()

    def wrap(name, w):
        if not name.endswith(".kernel"):
            return w
        prefix = _peft_prefix(name)
        if prefix + ".lora_A.weight" not in tensors:
            return w
        module = prefix[len("base_model.model.model."):]
        a = tensors[prefix + ".lora_A.weight"].T
        b = tensors[prefix + ".lora_B.weight"].T
        if a.shape[0] != w.shape[0] or b.shape[1] != w.shape[1]:
            raise CheckpointError(f"{w_path}: adapter for {name} has shape {a.shape} @ {b.shape}, "
                                  f"the weight is {tuple(w.shape)}")
        used.update({prefix + ".lora_A.weight", prefix + ".lora_B.weight"})
        alpha = float(config.get("alpha_pattern", {}).get(module, config["lora_alpha"]))
        return LoRA(base=w, a=jnp.asarray(a), b=jnp.asarray(b), alpha=alpha,
                    dropout=float(config.get("lora_dropout", 0.0)))

    out = map_weights(wrap, tree)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{w_path}: {len(unused)} adapter tensors have no matching weight, "
                              f"e.g. {unused[0]}")
    return out
