"""The layer-by-layer calibration engine shared by GPTQ, AWQ and later pruning methods.

    x = embed(calibration tokens)                       # [n, T, D], on the device
    for each decoder block:
        for each stage (all projections, or q/k/v | o | gate/up | down when true-sequential):
            run the block on x in batches, tapping each target projection's input, and
            accumulate the statistic the method declares (X^T X, mean |x|, samples, ...)
            let the method compress the stage's projections from their statistics
        x = block(x)       # the compressed block's outputs (sequential) or the original's

Peak device memory is the model, one block's temporaries for a batch, the calibration
activations and the statistics of one block: never the whole model's activations.

A method plugs in by declaring its statistic and its per-layer function:

    class MyQuantizer(LayerMethod):
        def statistic(self, path, cfg):  return AbsMean()
        def compress_layer(self, path, w, stat, cfg):  return my_qarray(w, stat)

    model, report = calibrate(model, tokens, MyQuantizer(), targets={path: cfg, ...})

Taps are a leaf type of their own: the target kernels are wrapped in `_Tapped` inside the
traced forward, and `linear()` (which dispatches on leaf types) hands their inputs to the
statistic. The model code is not touched and knows nothing about calibration.

The Fisher diagonal (SqueezeLLM) needs gradients of the whole model's loss, not block
inputs: `fisher_diagonal` computes it over the calibration sequences.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import UserError
from jaxcompress.models.build import flat_params, path_str
from jaxcompress.models.rope import rope_cos_sin
from jaxcompress.ops.linear import linear, register_linear

# Projections of a decoder block, by their name inside the block.
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The reference GPTQ's --true-sequential order: each stage sees the earlier stages quantized.
TRUE_SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                   ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
# Projections reading the same tensor as another one (the RMSNorm outputs).
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}
HIGHEST = jax.lax.Precision.HIGHEST  # fp32 statistics must not go through TF32 on GPUs


# ---------------------------------------------------------------------------- statistics
class Statistic:
    """What a method accumulates from one projection's inputs `x [b, T, K]`.

    Subclasses are frozen dataclasses (hashable: the accumulation is jitted with them as
    static arguments). `offset` is the index of the batch's first sequence (a traced int).
    """

    def init(self, num_seqs: int, seqlen: int, dim: int, dtype, batch_size: int) -> Any:
        raise NotImplementedError

    def update(self, state: Any, x: jax.Array, offset: jax.Array) -> Any:
        raise NotImplementedError

    def finalize(self, state: Any) -> Any:
        return state


@dataclasses.dataclass(frozen=True)
class Hessian(Statistic):
    """H = X^T X / tokens [K, K] in fp32 (GPTQ's 2/n X^T X up to a factor it is invariant to).

    `first_token_weight` w counts each window's first token (the attention sink) w times:
    H = (X^T X + (w - 1) X_0^T X_0) / (tokens + (w - 1) windows). w = 1 is the plain mean.
    """

    first_token_weight: float = 1.0

    def init(self, num_seqs, seqlen, dim, dtype, batch_size):
        return {"xtx": jnp.zeros((dim, dim), jnp.float32), "count": jnp.zeros((), jnp.float32)}

    def update(self, state, x, offset):
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        xtx = state["xtx"] + jnp.dot(x2.T, x2, precision=HIGHEST)
        count = state["count"] + x2.shape[0]
        extra = self.first_token_weight - 1.0
        if extra:
            x0 = x[:, 0].astype(jnp.float32)
            xtx = xtx + extra * jnp.dot(x0.T, x0, precision=HIGHEST)
            count = count + extra * x0.shape[0]
        return {"xtx": xtx, "count": count}

    def finalize(self, state):
        return state["xtx"] / state["count"]


@dataclasses.dataclass(frozen=True)
class AbsMean(Statistic):
    """Mean |x| per input channel [K] (AWQ's activation scale)."""

    def init(self, num_seqs, seqlen, dim, dtype, batch_size):
        return {"sum": jnp.zeros((dim,), jnp.float32), "count": jnp.zeros((), jnp.float32)}

    def update(self, state, x, offset):
        x2 = jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        return {"sum": state["sum"] + x2.sum(0), "count": state["count"] + x2.shape[0]}

    def finalize(self, state):
        return state["sum"] / state["count"]


@dataclasses.dataclass(frozen=True)
class Samples(Statistic):
    """The inputs themselves [min(n, max_seqs), T, K] in the compute dtype."""

    max_seqs: int | None = None

    def init(self, num_seqs, seqlen, dim, dtype, batch_size):
        if self.max_seqs is None or self.max_seqs >= num_seqs:
            return jnp.zeros((num_seqs, seqlen, dim), dtype)
        # A spare tail of one batch absorbs the batches past max_seqs (dropped in finalize).
        return jnp.zeros((self.max_seqs + batch_size, seqlen, dim), dtype)

    def update(self, state, x, offset):
        start = offset if self.max_seqs is None else jnp.minimum(offset, self.max_seqs)
        return jax.lax.dynamic_update_slice(state, x.astype(state.dtype), (start, 0, 0))

    def finalize(self, state):
        return state if self.max_seqs is None else state[:self.max_seqs]


# ------------------------------------------------------------------------------- taps
_TAPS: contextvars.ContextVar[dict] = contextvars.ContextVar("jaxcompress_calibration_taps")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tapped:
    """A kernel whose input the engine records (only ever lives inside a traced forward)."""

    w: Any
    name: str = dataclasses.field(metadata=dict(static=True))


@register_linear(_Tapped)
def _tapped_linear(x, t: _Tapped):
    _TAPS.get()[t.name] = x
    return linear(x, t.w)


def submodule(layer, name: str):
    """`layer.self_attn.q_proj` from "self_attn.q_proj"."""
    for part in name.split("."):
        layer = getattr(layer, part)
    return layer


def _call_layer(layer, x):
    """The decoder layer on full calibration windows x [b, T, D] (positions 0..T-1)."""
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos_sin = rope_cos_sin(layer.self_attn.cfg, positions)
    y, _ = layer(x, positions, cos_sin)
    return y


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, x):
    return _call_layer(nnx.merge(graphdef, state), x)


def _accumulate_impl(graphdef, state, x, states, offset, taps, want_output):
    layer = nnx.merge(graphdef, state)
    for name, _ in taps:
        kernel = submodule(layer, name).kernel
        kernel.set_value(_Tapped(kernel.get_value(), name))
    seen: dict[str, jax.Array] = {}
    token = _TAPS.set(seen)
    try:
        y = _call_layer(layer, x)
    finally:
        _TAPS.reset(token)
    new = {name: stat.update(states[name], seen[name], offset) for name, stat in taps}
    return new, (y if want_output else None)


@functools.lru_cache(maxsize=None)
def _accumulate_fn(donate: bool):
    # Donating the statistics lets sample buffers be updated in place (not supported on CPU).
    return jax.jit(_accumulate_impl, static_argnames=("graphdef", "taps", "want_output"),
                   donate_argnames=("states",) if donate else ())


# ------------------------------------------------------------------------------ blocks
@dataclasses.dataclass
class Block:
    """One decoder layer during calibration. `module` is the engine's own copy (mutable);
    a method reads and replaces weights through `weight` / `set_weight`."""

    index: int
    module: Any  # DecoderLayer
    batch_size: int

    def path(self, name: str) -> str:
        return f"layers.{self.index}.{name}.kernel"

    def weight(self, name: str):
        return submodule(self.module, name).kernel.get_value()

    def set_weight(self, name: str, leaf) -> None:
        submodule(self.module, name).kernel.set_value(leaf)

    def run(self, x: jax.Array) -> jax.Array:
        """The block's outputs for inputs x [n, T, D], computed in batches."""
        graphdef, state = nnx.split(self.module)
        return jnp.concatenate([_forward(graphdef, state, x[s:s + self.batch_size])
                                for s in range(0, x.shape[0], self.batch_size)])

    def map_batches(self, fn: Callable, *arrays: jax.Array):
        """[fn(*batch) for each batch of sequences] of arrays with a leading [n] axis."""
        n = arrays[0].shape[0]
        return [fn(*(a[s:s + self.batch_size] for a in arrays)) for s in range(0, n, self.batch_size)]

    def accumulate(self, x: jax.Array, stats: dict[str, Statistic], want_output: bool = False):
        """Statistics {name: value} of the inputs of the named projections over x [n, T, D]
        (and the block's outputs when `want_output`). Projections that read the same input
        (q/k/v, gate/up) and ask for equal statistics share one value (the same object)."""
        n, t, _ = x.shape
        graphdef, state = nnx.split(self.module)
        first: dict[tuple, str] = {}  # (input, statistic) -> the projection tapped for it
        for name, stat in stats.items():
            first.setdefault((SHARED_INPUT.get(name, name), stat), name)
        tapped = {name: stat for (_, stat), name in first.items()}
        states = {name: stat.init(n, t, _in_dim(self.weight(name)), x.dtype, self.batch_size)
                  for name, stat in tapped.items()}
        taps = tuple(sorted(tapped.items()))
        fn = _accumulate_fn(jax.default_backend() != "cpu")
        outputs = []
        for s in range(0, n, self.batch_size):
            states, y = fn(graphdef, state, x[s:s + self.batch_size], states, jnp.int32(s), taps, want_output)
            if want_output:
                outputs.append(y)
        values = {name: tapped[name].finalize(states[name]) for name in tapped}
        for name, value in values.items():
            check_finite(value, f"{self.path(name)}: the {type(tapped[name]).__name__} of its calibration inputs")
        values = {name: values[first[SHARED_INPUT.get(name, name), stat]] for name, stat in stats.items()}
        return values, (jnp.concatenate(outputs) if want_output else None)


def _in_dim(w) -> int:
    return int(w.shape[0])


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def check_finite(value, what: str) -> None:
    """Raises `UserError` if any array in `value` holds NaN or Inf, naming `what` and the value."""
    for leaf in jax.tree_util.tree_leaves(value):
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        count = int(_count_nonfinite(leaf))
        if count:
            bad = ~jnp.isfinite(leaf)
            where = np.unravel_index(int(jnp.argmax(bad.reshape(-1))), leaf.shape)
            first = float(leaf[where])
            raise UserError(f"{what} contains {count} non-finite value(s) (first: {first} at index "
                            f"{tuple(int(i) for i in where)}); the model overflows or the calibration data "
                            f"is bad: try float32 (--dtype float32) or other calibration text")


# ----------------------------------------------------------------------------- methods
class Method:
    """A compression method the engine runs. Override `statistic` and `compress_block`
    (or subclass `LayerMethod` and override `compress_layer`)."""

    sequential: bool = True  # feed the compressed block's outputs (False: the original's) onward

    def statistic(self, path: str, cfg: Any) -> Statistic:
        """The statistic to accumulate from the inputs of the projection at `path`."""
        raise NotImplementedError

    def taps(self, block: "Block", targets: dict[str, Any]) -> dict[str, Statistic]:
        """{name: statistic} of the projections whose inputs a stage needs (default: the
        targets themselves; a method may also tap projections it does not compress)."""
        return {name: self.statistic(block.path(name), cfg) for name, cfg in targets.items()}

    def stages(self, names: list[str]) -> list[list[str]]:
        """Groups of projections compressed together, each tapped after the previous ones."""
        return [names]

    def compress_block(self, block: Block, stats: dict[str, Any], targets: dict[str, Any]) -> dict:
        """Compresses the projections in `targets` ({name: cfg}) from their statistics, by
        calling `block.set_weight`; returns {path: info} for the report."""
        raise NotImplementedError


class LayerMethod(Method):
    """A method that compresses each projection on its own: `compress_layer(path, w, stat, cfg)`
    returns the new leaf (a QArray, a sparse array, ...) for the dense kernel w [K, N]."""

    def compress_layer(self, path: str, w: jax.Array, stat: Any, cfg: Any):
        raise NotImplementedError

    def compress_block(self, block, stats, targets):
        info = {}
        for name, cfg in targets.items():
            leaf = self.compress_layer(block.path(name), block.weight(name), stats[name], cfg)
            if isinstance(leaf, tuple):  # (leaf, info)
                leaf, info[block.path(name)] = leaf
            block.set_weight(name, leaf)
        return info


def _batch_size(n: int, batch_size: int) -> int:
    """The largest divisor of n not above batch_size (equal batches: one compiled program)."""
    return max(d for d in range(1, min(n, batch_size) + 1) if n % d == 0)


def block_targets(targets: dict[str, Any], index: int) -> dict[str, Any]:
    """{name inside block: cfg} for the targeted projections of block `index`."""
    out = {}
    for name in LINEARS:
        path = f"layers.{index}.{name}.kernel"
        if path in targets:
            out[name] = targets[path]
    return out


def calibration_inputs(model, tokens) -> jax.Array:
    """The first block's inputs [n, T, D] for calibration tokens [n, T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return model.embed_tokens(tokens).astype(model.dtype)


def calibrate(model, tokens, method: Method, targets: dict[str, Any], *, batch_size: int = 8,
              log: Callable[[str], None] | None = None):
    """Runs `method` block by block over calibration tokens [n, T].

    `targets` maps parameter paths (`layers.3.mlp.down_proj.kernel`) to the method's per-layer
    config. Returns (new model, report): the input model is unchanged; the report holds the
    method's per-layer info and the timing.
    """
    unknown = [p for p in targets if not any(p == f"layers.{i}.{n}.kernel"
                                             for i in range(len(model.layers)) for n in LINEARS)]
    if unknown:
        raise UserError(f"{unknown[0]}: the calibration engine compresses decoder-block projections only")
    start = time.time()
    model = nnx.clone(model)
    n = int(np.shape(tokens)[0])
    bs = _batch_size(n, batch_size)
    x = calibration_inputs(model, tokens)
    check_finite(x, "the embeddings of the calibration tokens")
    report: dict[str, Any] = {"layers": {}, "block_seconds": []}
    for i, layer in enumerate(model.layers):
        t0 = time.time()
        block = Block(i, layer, bs)
        chosen = block_targets(targets, i)
        if not chosen:
            x = block.run(x)
            continue
        check_finite(x, f"layers.{i}: the calibration activations entering the block")
        y_original = None
        for stage in method.stages(list(chosen)):
            stage = [name for name in stage if name in chosen]
            if not stage:
                continue
            want = y_original is None and not method.sequential  # the first pass sees the original block
            stage_targets = {name: chosen[name] for name in stage}
            stats, y = block.accumulate(x, method.taps(block, stage_targets), want_output=want)
            if want:
                y_original = y
            report["layers"].update(method.compress_block(block, stats, stage_targets) or {})
            del stats
        x = block.run(x) if method.sequential else y_original
        jax.block_until_ready(x)
        report["block_seconds"].append(round(time.time() - t0, 3))
        if log:
            log(f"block {i + 1}/{len(model.layers)}: {len(chosen)} projections, {time.time() - t0:.1f}s")
    report["seconds"] = round(time.time() - start, 2)
    return model, report


# ------------------------------------------------------------------------ Fisher diagonal
def fisher_diagonal(model, tokens, paths: list[str], *, log: Callable[[str], None] | None = None
                    ) -> dict[str, jax.Array]:
    """Empirical Fisher diagonal sum_s (dL_s/dW)^2 [K, N] (fp32) for the named kernels.

    L_s is the mean next-token cross-entropy of calibration sequence s (tokens [n, T]); one
    gradient per sequence, squared and summed, as SqueezeLLM computes its sensitivities.
    Only the named kernels are differentiated, so gradient memory is theirs alone.
    """
    graphdef, state = nnx.split(model)
    flat = {path_str(p): v for p, v in flat_params(model).items()}
    for p in paths:
        if p not in flat or not isinstance(flat[p], jax.Array):
            raise UserError(f"{p}: the Fisher diagonal needs a dense weight at this path")
    wanted = {p: flat[p] for p in paths}

    def loss_fn(kernels, state, seq):
        # Rebuild the state with the differentiated kernels (new Variables: nothing is mutated).
        items = [(p, v.replace(kernels[path_str(p)]) if path_str(p) in kernels else v)
                 for p, v in nnx.to_flat_state(state)]
        m = nnx.merge(graphdef, nnx.from_flat_state(items))
        logits, _ = m(seq[None, :-1])
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, seq[1:, None], axis=-1))

    @jax.jit
    def step(acc, kernels, state, seq):
        grads = jax.grad(loss_fn)(kernels, state, seq)
        return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)

    acc = {p: jnp.zeros(w.shape, jnp.float32) for p, w in wanted.items()}
    tokens = jnp.asarray(tokens, jnp.int32)
    t0 = time.time()
    for s in range(tokens.shape[0]):
        acc = step(acc, wanted, state, tokens[s])
        if log and (s + 1) % 16 == 0:
            log(f"fisher: {s + 1}/{tokens.shape[0]} sequences, {time.time() - t0:.1f}s")
    for p, value in acc.items():
        check_finite(value, f"{p}: the Fisher diagonal of the calibration loss")
    return acc
