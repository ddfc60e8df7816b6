"""The trainer that LoRA, QLoRA, QAT and full fine-tuning (and later distillation) share.

    params tree  --prepare (mode)-->  tree with LoRA / FakeQuant leaves
                 --partition------->  trainable {name: fp32 array}  +  frozen {name: leaf array}
    step(state, frozen, batch[A, B, L]) -> state', metrics       (one jax.jit, NamedSharding)

Only the trainable leaves reach the optimizer (a partition, not a mask: frozen weights get no
gradient buffers and no optimizer state). Trainable leaves are fp32 master weights; the
forward pass runs in the compute dtype (`linear()` casts each weight to the activations'
dtype). The loss is the token-weighted mean next-token NLL over all A micro-batches of a step
(gradient accumulation inside the step with `lax.scan`, identical to one big batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.train.config import TrainConfig
from jaxcompress.train.lora import LoRA, add_lora, key_name, map_weights, with_dropout_keys
from jaxcompress.train.qat import FakeQuant, add_fake_quant, quantize_weights
from jaxcompress.train.sharding import Sharder

Tree = Any


# ------------------------------------------------------------------------------ preparing the tree
def prepare_params(tree: Tree, cfg: TrainConfig, key: jax.Array) -> Tree:
    """The parameter tree with the leaves the mode trains through (pure function)."""
    if cfg.mode == "qlora":
        tree = quantize_weights(tree, cfg.quant.targets, cfg.quant.layer())  # kernels already QArray stay
    if cfg.mode in ("lora", "qlora"):
        tree = add_lora(tree, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, key, cfg.lora.dropout)
    elif cfg.mode == "qat":
        tree = add_fake_quant(tree, cfg.quant.targets, cfg.quant.layer(), cfg.qat.scales)
    return tree


def trainable_mask(tree: Tree, cfg: TrainConfig) -> Tree:
    """A tree of bools with the structure of `tree`: which arrays the optimizer updates.

    lora/qlora: the adapters a, b.  qat: every floating-point array except fixed scales and
    zero points.  full: every floating-point array.  `trainable` (regex over weight names) adds
    dense weights to any mode (e.g. the norms of a LoRA run).
    """
    extra = None
    if cfg.trainable is not None:
        patterns = [cfg.trainable] if isinstance(cfg.trainable, str) else cfg.trainable
        extra = [re.compile(p) for p in patterns]
    hit = set()

    def mark(name, w):
        if isinstance(w, LoRA):
            return dataclasses.replace(w, base=jax.tree_util.tree_map(lambda _: False, w.base), a=True, b=True)
        if isinstance(w, FakeQuant):
            return dataclasses.replace(w, w=True, scale=None if w.scale is None else w.learn_scale,
                                       zero=None if w.zero is None else False)
        if dataclasses.is_dataclass(w):  # frozen compressed leaf (QArray, ...)
            return jax.tree_util.tree_map(lambda _: False, w)
        if extra is not None and any(p.fullmatch(name) for p in extra):
            hit.add(name)
            return True
        return cfg.mode in ("qat", "full") and jnp.issubdtype(w.dtype, jnp.floating)

    mask = map_weights(mark, tree)
    if extra is not None and not hit:
        raise ConfigError(f"trainable={cfg.trainable!r} matches no dense parameter (names look like "
                          f"layers.0.input_layernorm.scale; the regex must match the whole name)")
    return mask


@dataclasses.dataclass(frozen=True)
class Partition:
    """Splits a parameter tree into trainable and frozen {name: array} dicts and back."""

    treedef: Any
    names: tuple[str, ...]
    trainable: frozenset[str]

    @classmethod
    def create(cls, tree: Tree, mask: Tree) -> "Partition":
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = tuple(key_name(p) for p, _ in flat)
        flags = treedef.flatten_up_to(mask)
        if len(set(names)) != len(names):
            raise ValueError("parameter names are not unique")
        chosen = frozenset(n for n, f in zip(names, flags) if f)
        if not chosen:
            raise ConfigError("nothing to train: the mode and `trainable` select no parameter")
        return cls(treedef, names, chosen)

    def split(self, tree: Tree) -> tuple[dict, dict]:
        leaves = self.treedef.flatten_up_to(tree)
        trainable = {n: v for n, v in zip(self.names, leaves) if n in self.trainable}
        frozen = {n: v for n, v in zip(self.names, leaves) if n not in self.trainable}
        return trainable, frozen

    def combine(self, trainable: dict, frozen: dict) -> Tree:
        return self.treedef.unflatten([trainable[n] if n in self.trainable else frozen[n] for n in self.names])


def count(tree_or_dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree_or_dict))


# ------------------------------------------------------------------------------ optimizer
def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to lr * end_lr_ratio, or constant."""
    warmup = min(optim.warmup_steps, total_steps)
    end = optim.lr * optim.end_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping."""
    schedule = make_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params))
    parts = ([optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []) + [adamw]
    return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------ the step
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    trainable: dict          # {name: fp32 array}
    opt_state: Any
    rng: jax.Array           # uint32 key data of the run's key; step keys are folded from it


def token_loss(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL, sum of weights) for a batch of rows [B, L]."""
    logits, _ = model(batch["tokens"], batch["positions"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    w = batch["weights"]
    return jnp.sum(nll * w), jnp.sum(w)


def _model(graphdef, partition: Partition, trainable: dict, frozen: dict, key=None):
    tree = partition.combine(trainable, frozen)
    if key is not None:
        tree = with_dropout_keys(tree, key)
    return nnx.merge(graphdef, tree)


# Module-level step functions with hashable static arguments: every Trainer with the same model
# layout, partition and optimizer shares one compiled program (jax caches by function identity).
STATIC = ("graphdef", "partition", "optim", "total_steps")


def train_step(state: TrainState, frozen: dict, batch: dict, *, graphdef, partition: Partition, optim,
               total_steps: int):
    """One optimizer step; batch arrays [A, B, L] are A micro-batches accumulated into one update."""
    tx, _ = make_optimizer(optim, total_steps)

    def loss_fn(trainable, mb, key):
        return token_loss(_model(graphdef, partition, trainable, frozen, key), mb)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    accum = batch["tokens"].shape[0]
    if accum == 1:  # no loop: a smaller program that compiles faster
        first = jax.tree_util.tree_map(lambda x: x[0], batch)
        (nll, n), grads = grad_fn(state.trainable, first, jax.random.fold_in(key, 0))
    else:
        def micro(carry, xs):
            grads, nll, n = carry
            mb, i = xs
            (mb_nll, mb_n), g = grad_fn(state.trainable, mb, jax.random.fold_in(key, i))
            return (jax.tree_util.tree_map(jnp.add, grads, g), nll + mb_nll, n + mb_n), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (grads, nll, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                          (batch, jnp.arange(accum)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "target_tokens": n,
               "tokens": jnp.sum(batch["positions"] >= 0).astype(jnp.float32)}
    return TrainState(state.step + 1, trainable, opt_state, state.rng), metrics


def _opt_init(trainable: dict, *, optim, total_steps: int):
    return make_optimizer(optim, total_steps)[0].init(trainable)


def eval_step(trainable: dict, frozen: dict, batch: dict, *, graphdef, partition: Partition):
    """(summed NLL, summed weights) of one held-out batch [B, L], no dropout."""
    return token_loss(_model(graphdef, partition, trainable, frozen), batch)


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


class Trainer:
    """Holds the partitioned, sharded parameters and the compiled step of one run."""

    def __init__(self, cfg: TrainConfig, model, total_steps: int, sharder: Sharder):
        self.cfg = cfg
        self.sharder = sharder
        self.total_steps = total_steps
        key = jax.random.key(cfg.seed)
        graphdef, state = nnx.split(model)
        tree = prepare_params(nnx.to_pure_dict(state), cfg, jax.random.fold_in(key, 1))
        del state, model
        self.graphdef = graphdef
        self.partition = Partition.create(tree, trainable_mask(tree, cfg))
        shardings = sharder.params(tree)
        self.param_shardings = shardings
        trainable, frozen = self.partition.split(tree)
        self.storage_dtypes = {n: v.dtype for n, v in trainable.items()}
        del tree
        self.trainable_shardings, self.frozen_shardings = self.partition.split(shardings)
        self.frozen = jax.device_put(frozen, self.frozen_shardings)
        trainable = jax.device_put({n: v.astype(jnp.float32) for n, v in trainable.items()},
                                   self.trainable_shardings)
        self.tx, self.schedule = make_optimizer(cfg.optim, total_steps)
        replicated = sharder.replicated
        abstract_opt = jax.eval_shape(self.tx.init, trainable)
        opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.trainable_shardings,
                                              transform_non_params=lambda _: replicated)
        opt_state = jax.jit(_opt_init, static_argnames=("optim", "total_steps"), out_shardings=opt_shardings)(
            trainable, optim=cfg.optim, total_steps=total_steps)
        rng = jax.device_put(jax.random.key_data(jax.random.fold_in(key, 2)), replicated)
        self.state = TrainState(jax.device_put(jnp.int32(0), replicated), trainable, opt_state, rng)
        self.state_shardings = TrainState(replicated, self.trainable_shardings, opt_shardings, replicated)
        self._batch_shardings: dict = {}
        static = dict(graphdef=graphdef, partition=self.partition)
        # Inputs arrive placed (device_put / make_array_from_process_local_data with their
        # NamedShardings), so jit takes their shardings; outputs are pinned to the same layout.
        step = jax.jit(train_step, static_argnames=STATIC, donate_argnums=(0,),
                       out_shardings=(self.state_shardings, replicated))
        self._step = functools.partial(step, **static, optim=cfg.optim, total_steps=total_steps)
        evaluate = jax.jit(eval_step, static_argnames=STATIC[:2], out_shardings=replicated)
        self._eval = functools.partial(evaluate, **static)

    # -------------------------------------------------------------- placement
    def _global(self, arrays: dict[str, np.ndarray], batch_dim: int) -> dict[str, jax.Array]:
        """Host arrays (this process's slice of the batch) -> global sharded jax.Arrays."""
        out = {}
        procs = jax.process_count()
        for name, local in arrays.items():
            shape = list(local.shape)
            shape[batch_dim] *= procs
            shape = tuple(shape)
            key = (shape, batch_dim)
            if key not in self._batch_shardings:
                self._batch_shardings[key] = self.sharder.batch(shape, batch_dim)
            out[name] = jax.make_array_from_process_local_data(self._batch_shardings[key], local, shape)
        return out

    # -------------------------------------------------------------- steps
    def step(self, micro_batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
        """One optimizer step over the given micro-batches (each [B_local, L] on this process)."""
        stacked = {k: np.stack([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        batch = self._global(stacked, batch_dim=1)
        self.state, metrics = self._step(self.state, self.frozen, batch)
        return metrics

    def eval_loss(self, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Token-weighted mean NLL and perplexity over held-out batches."""
        sums = [self._eval(self.state.trainable, self.frozen, self._global(b, batch_dim=0)) for b in batches]
        nll = sum(float(s) for s, _ in sums)
        n = sum(float(c) for _, c in sums)
        loss = nll / max(n, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}

    def lr(self, step: int) -> float:
        return float(self.schedule(step))

    @property
    def step_count(self) -> int:
        return int(self.state.step)

    # -------------------------------------------------------------- the trained model
    def tree(self) -> Tree:
        """The full parameter tree with the current (fp32 master) trainable values."""
        return self.partition.combine(self.state.trainable, self.frozen)

    def export_tree(self) -> Tree:
        """As `tree()`, each trainable array cast back to the dtype it had before training
        (adapters and fake-quant masters were created in fp32 and stay so)."""
        cast = {n: v.astype(self.storage_dtypes[n]) for n, v in self.state.trainable.items()}
        return self.partition.combine(cast, self.frozen)

    def model(self):
        return nnx.merge(self.graphdef, self.tree())

    def trainable_count(self) -> int:
        return count(self.state.trainable)

    def frozen_count(self) -> int:
        return count(self.frozen)
