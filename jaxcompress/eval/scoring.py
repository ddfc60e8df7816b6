"""Log-likelihood scoring: the engine behind every multiple-choice task, LAMBADA, rolling
log-likelihoods and the lm-evaluation-harness adapter.

A request is a (context, continuation) pair of strings; its score is
`sum_i log p(continuation_i | context, continuation_<i)` and whether greedy decoding would
have produced the continuation. Encoding follows lm-evaluation-harness exactly:
  - trailing whitespace of the context moves to the front of the continuation;
  - the continuation's tokens are `encode(context + continuation)[len(encode(context)):]`;
  - no special tokens are added; an empty context becomes the single prefix token (EOS);
  - an input longer than `max_length` keeps its last `max_length + 1` tokens.

Speed: requests are sorted by length and cut into batches whose padded shapes come from a
short ladder (powers of two), so a whole evaluation compiles a handful of programs, shared by
every task that scores with the same model. When several continuations share a long context
(few-shot prompts, passages), the context runs once into a KV cache that each continuation
then reads ("shared" path); otherwise each request is one row ("flat" path).

Shapes: B rows, L padded length, N continuations per context, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.models.cache import IdentityCodec, KVCache

Tokens = list[int]
MIN_LENGTH = 16                    # smallest padded length on the flat path
# Share a context's forward pass between its continuations when it is long, in absolute terms
# (fewer programs to compile for the short zero-shot prompts) and against its continuations.
SHARE_MIN_CONTEXT = 128
SHARE_RATIO = 2


def default_batch_tokens() -> int:
    """Tokens per batch: big on accelerators, small on the CPU (tests)."""
    return 16384 if jax.default_backend() != "cpu" else 2048


def bucket(n: int, minimum: int = 1) -> int:
    """The padded size for n: the next power of two (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def rows_for(tokens_per_row: int, batch_tokens: int) -> int:
    """Rows per batch for a padded row length: a power of two within the token budget."""
    return 1 << max(0, (max(1, batch_tokens // max(1, tokens_per_row))).bit_length() - 1)


# ------------------------------------------------------------------------------------ encoding
def encode(tokenizer, texts: Sequence[str]) -> list[Tokens]:
    """Token ids of each text, no special tokens (lm-evaluation-harness' causal-LM default)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prefix_token_id(tokenizer, config=None) -> int:
    """The token that stands for an empty context (lm-eval: the end-of-text token)."""
    for tid in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)):
        if tid is not None:
            return int(tid)
    if config is not None and config.eos_token_ids:
        return int(config.eos_token_ids[0])
    raise UserError("the tokenizer has neither an EOS nor a BOS token; an empty context cannot be scored")


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], prefix_id: int) -> list[tuple[Tokens, Tokens]]:
    """(context tokens, continuation tokens) per (context, continuation) string pair."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    # One batched tokenizer call for all contexts and all wholes (fast tokenizers parallelise it).
    nonempty = [i for i, (c, _) in enumerate(moved) if c]
    ctx_ids = encode(tokenizer, [moved[i][0] for i in nonempty])
    whole_ids = encode(tokenizer, [moved[i][0] + moved[i][1] for i in nonempty])
    empty = [i for i, (c, _) in enumerate(moved) if not c]
    cont_only = encode(tokenizer, [moved[i][1] for i in empty])
    out: list[tuple[Tokens, Tokens] | None] = [None] * len(pairs)
    for i, ctx, whole in zip(nonempty, ctx_ids, whole_ids):
        out[i] = (ctx, whole[len(ctx):])
    for i, cont in zip(empty, cont_only):
        out[i] = ([prefix_id], cont)
    return out  # type: ignore[return-value]


def rolling_windows(tokens: Tokens, prefix_id: int, max_length: int) -> list[tuple[Tokens, Tokens]]:
    """Disjoint (context, continuation) windows that predict every token exactly once, each
    with as much left context as fits (lm-eval's `loglikelihood_rolling`, context_len=1)."""
    windows = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_id], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        # The input is tokens[end - max_length - 1 : end - 1]; the context is what precedes the
        # n predicted tokens in it.
        start = max(0, end - max_length - 1)
        windows.append((tokens[start:end - n], tokens[end - n:end]))
        predicted = end
    return windows


# ------------------------------------------------------------------------------ device programs
def _target_scores(logits, targets, weights):
    """Summed log-probabilities of the targets and whether each was the argmax.

    logits [R, L, V] fp32; targets [R, L] int; weights [R, L] (1 = scored) -> ([R], [R]).
    """
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = jnp.sum((picked - logz) * weights, axis=-1)
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=-1)
    return logprob, greedy


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_flat(graphdef, codec, state, tokens, positions, targets, weights):
    """One row per request: tokens/positions/targets/weights [B, L] -> ([B], [B])."""
    model = nnx.merge(graphdef, state)
    cache = None
    if codec is not None:  # run attention through the codec, as generation would
        cache = KVCache.create(model.config, tokens.shape[0], tokens.shape[1], model.dtype, codec)
    h, _ = model.hidden_states(tokens, positions, cache)
    return _target_scores(model.logits(h), targets, weights)


def _repeat_rows(cache: KVCache, n: int, batch: int) -> KVCache:
    """Each cache row repeated n times (row-major), for n continuations of one context."""
    def rep(x):
        if x.ndim == 0:
            return x
        if x.shape[0] != batch:
            raise ConfigError(f"KV codec {type(cache.codec).__name__} stores a leaf of shape {x.shape} "
                              f"that is not batch-major; shared-context scoring cannot split it: "
                              f"pass --task-opt share_context=false")
        return jnp.repeat(x, n, axis=0)

    return jax.tree.map(rep, cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_shared(graphdef, codec, state, ctx, ctx_pos, cont, cont_pos, targets, weights):
    """Contexts [B, Lc] (left-padded) run once; continuations [B, N, Lk] read their cache.

    The first continuation token is predicted by the context's last position, token j > 0 by
    continuation position j - 1. Returns ([B, N], [B, N]).
    """
    model = nnx.merge(graphdef, state)
    b, lc = ctx.shape
    _, n, lk = cont.shape
    cache = KVCache.create(model.config, b, lc + lk, model.dtype, codec or IdentityCodec())
    h_ctx, cache = model.hidden_states(ctx, ctx_pos, cache)
    cache = _repeat_rows(cache, n, b)
    h_cont, _ = model.hidden_states(cont.reshape(b * n, lk), cont_pos.reshape(b * n, lk), cache)
    last = jnp.repeat(h_ctx[:, -1:], n, axis=0)
    h = jnp.concatenate([last, h_cont[:, :-1]], axis=1)
    logprob, greedy = _target_scores(model.logits(h), targets.reshape(b * n, lk), weights.reshape(b * n, lk))
    return logprob.reshape(b, n), greedy.reshape(b, n)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_next_token(graphdef, codec, state, ctx, ctx_pos, targets):
    """Single-token continuations (" A", " yes"): one pass over the contexts [B, Lc]
    (left-padded); the last position's distribution scores every target [B, N]."""
    model = nnx.merge(graphdef, state)
    cache = None
    if codec is not None:
        cache = KVCache.create(model.config, ctx.shape[0], ctx.shape[1], model.dtype, codec)
    h, _ = model.hidden_states(ctx, ctx_pos, cache)
    logits = model.logits(h[:, -1])  # [B, V]
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    logprob = jnp.take_along_axis(logits, targets, axis=-1) - logz
    greedy = jnp.argmax(logits, axis=-1)[:, None] == targets
    return logprob, greedy


# ----------------------------------------------------------------------------------- the scorer
@dataclasses.dataclass
class _Group:
    """Continuations that share one context (request indices and their continuation tokens)."""
    context: Tokens
    items: list[tuple[int, Tokens]]


class Scorer:
    """Scores log-likelihood requests for one LoadedModel.

    max_length: the longest input (default: the model's max_position_embeddings);
    batch_tokens: padded tokens per batch; share_context: allow the shared-context path.
    """

    def __init__(self, loaded, *, max_length: int | None = None, batch_tokens: int | None = None,
                 share_context: bool = True):
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.spec}: this model has no tokenizer; log-likelihood tasks need one")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_length = int(max_length or loaded.config.max_position_embeddings)
        self.batch_tokens = int(batch_tokens or default_batch_tokens())
        self.share_context = share_context
        self.prefix_id = prefix_token_id(self.tokenizer, loaded.config)
        self.graphdef, self.state = nnx.split(loaded.model)
        self.codec = loaded.kv_codec
        self.pad_id = 0

    # -- strings in
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str | None = None,
                      progress: bool = True) -> list[tuple[float, bool]]:
        pairs = encode_pairs(self.tokenizer, requests, self.prefix_id)
        return self.loglikelihood_tokens(pairs, desc=desc, progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str | None = None,
                              progress: bool = True) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of at most max_length."""
        windows, owner = [], []
        for i, ids in enumerate(encode(self.tokenizer, texts)):
            for w in rolling_windows(ids, self.prefix_id, self.max_length):
                windows.append(w)
                owner.append(i)
        scores = self.loglikelihood_tokens(windows, desc=desc, progress=progress)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        return totals

    # -- tokens in
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str | None = None, progress: bool = True) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per token pair, in order."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if not cont:  # nothing to predict: probability one, trivially greedy
                results[i] = (0.0, True)
                continue
            if not ctx:
                raise UserError(f"request {i} has an empty context; encode it with a prefix token")
            groups.setdefault(tuple(ctx), _Group(ctx, [])).items.append((i, cont))
        shared, flat = [], []
        for g in groups.values():
            longest = max(len(c) for _, c in g.items)
            fits = len(g.context) + longest <= self.max_length + 1
            if (self.share_context and len(g.items) > 1 and fits
                    and len(g.context) >= max(SHARE_MIN_CONTEXT, SHARE_RATIO * longest)):
                shared.append(g)
            else:
                flat.extend((i, g.context, c) for i, c in g.items)
        batches = list(self._flat_batches(flat)) + list(self._shared_batches(shared))
        from tqdm.auto import tqdm

        pending = []
        bar = tqdm(total=len(pairs), desc=desc or "loglikelihood", unit="req", disable=not progress,
                   leave=False)
        for run, owners in batches:
            pending.append((run(), owners))  # dispatch is asynchronous: keep the device busy
            if len(pending) > 4:
                self._collect(pending.pop(0), results, bar)
        for item in pending:
            self._collect(item, results, bar)
        bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _collect(item, results, bar):
        (logprob, greedy), owners = item
        logprob = np.asarray(logprob, dtype=np.float64).reshape(-1)
        greedy = np.asarray(greedy).reshape(-1)
        for slot, i in enumerate(owners):
            if i >= 0:
                results[i] = (float(logprob[slot]), bool(greedy[slot]))
        bar.update(sum(1 for i in owners if i >= 0))

    # -- batching
    @staticmethod
    def _runs(items, key, rows):
        """Sorts items by their shape key (largest first) and cuts runs of one key into batches
        of `rows(key)` rows: every batch of one key has the same padded shape."""
        items = sorted(items, key=key, reverse=True)
        start = 0
        while start < len(items):
            k = key(items[start])
            b = rows(k)
            stop = start
            while stop < len(items) and stop - start < b and key(items[stop]) == k:
                stop += 1
            yield k, b, items[start:stop]
            start = stop

    def _flat_batches(self, items):
        """(thunk, owners) per batch; owners[r] is the request index of row r (-1 = padding)."""
        rows = []
        for i, ctx, cont in items:
            seq = (ctx + cont)[-(self.max_length + 1):]
            rows.append((i, seq, min(len(cont), len(seq) - 1)))
        key = lambda r: (bucket(len(r[1]) - 1, MIN_LENGTH),)  # noqa: E731
        for (length,), b, chunk in self._runs(rows, key, lambda k: rows_for(k[0], self.batch_tokens)):
            tokens = np.full((b, length), self.pad_id, np.int32)
            positions = np.full((b, length), -1, np.int32)
            targets = np.zeros((b, length), np.int32)
            weights = np.zeros((b, length), np.float32)
            owners = [-1] * b
            for r, (i, seq, n_scored) in enumerate(chunk):
                t = len(seq) - 1
                tokens[r, :t] = seq[:-1]
                positions[r, :t] = np.arange(t)
                targets[r, :t] = seq[1:]
                weights[r, t - n_scored:t] = 1.0
                owners[r] = i
            args = tuple(jnp.asarray(a) for a in (tokens, positions, targets, weights))
            yield (functools.partial(_score_flat, self.graphdef, self.codec, self.state, *args), owners)

    def _shared_batches(self, groups: list[_Group]):
        def key(g):
            return (bucket(len(g.context), MIN_LENGTH), bucket(len(g.items)),
                    bucket(max(len(c) for _, c in g.items)))

        def rows(k):
            lc, n, lk = k
            return rows_for(lc + n * lk, self.batch_tokens)

        for (lc, n, lk), b, chunk in self._runs(groups, key, rows):
            ctx = np.full((b, lc), self.pad_id, np.int32)
            ctx_pos = np.full((b, lc), -1, np.int32)
            cont = np.full((b, n, lk), self.pad_id, np.int32)
            cont_pos = np.full((b, n, lk), -1, np.int32)
            weights = np.zeros((b, n, lk), np.float32)
            owners = [-1] * (b * n)
            for r, g in enumerate(chunk):
                c = len(g.context)
                ctx[r, lc - c:] = g.context
                ctx_pos[r, lc - c:] = np.arange(c)
                for j, (i, tokens) in enumerate(g.items):
                    k = len(tokens)
                    cont[r, j, :k] = tokens
                    cont_pos[r, j, :k] = c + np.arange(k)
                    weights[r, j, :k] = 1.0
                    owners[r * n + j] = i
            if lk == 1:  # no continuation pass needed (and half the program to compile)
                args = tuple(jnp.asarray(a) for a in (ctx, ctx_pos, cont[:, :, 0]))
                yield (functools.partial(_score_next_token, self.graphdef, self.codec, self.state, *args), owners)
                continue
            # The continuation tokens are also the targets (see _score_shared).
            args = tuple(jnp.asarray(a) for a in (ctx, ctx_pos, cont, cont_pos, cont, weights))
            yield (functools.partial(_score_shared, self.graphdef, self.codec, self.state, *args), owners)


def scorer_for(loaded, opts=None) -> Scorer:
    """The Scorer of a LoadedModel, configured from task options (`max_length`, `batch_tokens`,
    `share_context` in `opts.extra`). Compiled programs are cached per shape by jax and shared
    between scorers of models with the same structure."""
    extra = getattr(opts, "extra", None) or {}
    kwargs = {k: extra[k] for k in ("batch_tokens", "max_length", "share_context") if k in extra}
    return Scorer(loaded, **kwargs)
