"""Benchmarks of KV-cache compression: decode attention over long caches, and end-to-end decode.

Decode attention (`attention_benchmark`): one query token per row over `context` cached tokens
at a model's head shapes (Llama-2-7B: 32 query and 32 kv heads of 128). Variants, timed in the
same run on the same card:

    xla-bf16      the model's default path: `reference_attention` over a bf16 cache (XLA)
    pallas-bf16   the bf16 flash-decoding kernel over the same cache
    <codec>       the codec's `attend` (Pallas kernel over the packed store, plus the exact
                  tokens of a residual window or sink in XLA, merged)

Each variant is checked against a float reference first, then timed as `repeats` medians of
`calls` attention calls unrolled in one jitted program, as a decode step's layers are (each call
a fresh query; the cache, hundreds of MB, is far larger than L2): the wall clock a call and, on
GPUs, the kernels' own time (CUPTI) with each kernel's share. Bytes moved are the cache bytes
the variant must read; the roofline uses the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.bench.timing import copy_bandwidth, median_carried_seconds, median_seconds
from jaxcompress.kv.calibration import KVCalibration
from jaxcompress.models.cache import IdentityCodec, KVCodec
from jaxcompress.models.rope import apply_rope, rope_cos_sin
from jaxcompress.ops.attention import attention_mask, reference_attention

WRITE_CHUNK = 8192  # tokens per write while filling a cache (bounds the transient memory)


def synthetic_kvquant_calibration(cfg, key_bits: int, value_bits: int, seed: int = 0) -> KVCalibration:
    """A KVQuant calibration for random-weight models (benchmarks and GPU tests): per-channel
    ranges of +-3 around 0 and evenly spread datatypes, per layer."""
    rng = np.random.default_rng(seed)
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    def codebook(bits):
        cb = np.linspace(-1, 1, 2 ** bits) + rng.uniform(-0.02, 0.02, 2 ** bits)
        return np.sort(cb)[None].repeat(cfg.num_layers, 0).astype(np.float32)

    return KVCalibration({"k_mid": rng.normal(0, 0.1, shape).astype(np.float32),
                          "k_half": np.full(shape, 3.0, np.float32),
                          "k_codebook": codebook(key_bits), "v_codebook": codebook(value_bits)})


@dataclasses.dataclass
class DecodeInputs:
    """One layer's cache after `context` tokens, and what a decode query needs to attend."""
    codec: KVCodec
    state: object
    mask: jax.Array          # [B, 1, S]
    rotate_keys: object      # for pre-RoPE codecs, else None
    context: int


def filled_layer(cfg, codec: KVCodec | None, batch: int, context: int, max_len: int | None = None,
                 dtype=jnp.bfloat16, seed: int = 0, layer: int = 0) -> DecodeInputs:
    """A layer cache of `max_len` slots (default: context) holding `context` random tokens
    (positions 0..context-1), written through the codec in chunks as a prefill would; the mask
    is the last token's query."""
    codec = codec or IdentityCodec()
    max_len = max_len or context
    kvh, d = cfg.num_kv_heads, cfg.head_dim
    state = codec.init_layer(layer, batch, max_len, kvh, d, dtype)
    write = jax.jit(codec.write, donate_argnums=0)
    key = jax.random.key(seed)
    for start in range(0, context, WRITE_CHUNK):
        n = min(WRITE_CHUNK, context - start)
        key, kk, kv = jax.random.split(key, 3)
        k = jax.random.normal(kk, (batch, n, kvh, d), dtype)
        v = jax.random.normal(kv, (batch, n, kvh, d), dtype)
        pos = jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (batch, n))
        state = write(state, k, v, jnp.int32(start), pos)
    slots = jnp.arange(max_len, dtype=jnp.int32)
    slot_pos = jnp.broadcast_to(jnp.where(slots < context, slots, -1), (batch, max_len))
    mask = attention_mask(jnp.full((batch, 1), context - 1, jnp.int32), slot_pos, None)
    return DecodeInputs(codec, state, mask, slot_rotation(cfg, slot_pos) if codec.pre_rope else None, context)


def slot_rotation(cfg, slot_pos):
    """What the attention layer hands a pre-RoPE codec: RoPE by slot position, with its tables."""
    cos, sin = rope_cos_sin(cfg, jnp.maximum(slot_pos, 0))

    def rotate(k):
        return apply_rope(k, cos, sin)

    rotate.cos_sin = (cos, sin)
    return rotate


def attend_fn(inputs: DecodeInputs, cfg, variant: str, kernel_options: dict | None = None):
    """(state, q [B, 1, H, D]) -> [B, 1, H, D] for a variant ("codec": the codec's decode path,
    with `kernel_options` for the Pallas kernel)."""
    scale = cfg.head_dim ** -0.5
    if variant == "xla-bf16":
        return lambda state, q: reference_attention(q, state["k"], state["v"], inputs.mask, scale)
    if variant == "pallas-bf16":
        from pallas_kernels.decode_attention import combine, dense_decode_partials

        def dense(state, q):
            b, _, h, d = q.shape
            qg = q[:, 0].reshape(b, cfg.num_kv_heads, h // cfg.num_kv_heads, d)
            part = dense_decode_partials(qg, state["k"], state["v"], inputs.mask[:, 0], inputs.context,
                                         scale=scale, interpret=jax.default_backend() != "gpu", merge=False)
            return combine([part]).reshape(b, 1, h, d).astype(q.dtype)

        return dense
    if variant == "kernel-only":
        return kernel_only_fn(inputs, cfg, kernel_options or {})
    if kernel_options:
        return lambda state, q: inputs.codec.attend_decode(state, q, inputs.mask, scale, inputs.rotate_keys,
                                                           **kernel_options)
    return lambda state, q: inputs.codec.attend(state, q, inputs.mask, scale, rotate_keys=inputs.rotate_keys)


def _kernel_inputs(inputs: DecodeInputs, cfg, state, q):
    """What the packed kernel alone reads: grouped queries, the store mask (every token the
    mask allows, exact ones included: the kernel's work is the same), the quantized length."""
    b, _, h, d = q.shape
    kstore = state["k"]
    qg = q[:, 0].reshape(b, cfg.num_kv_heads, h // cfg.num_kv_heads, d)
    mask = jnp.pad(inputs.mask[:, 0, :], ((0, 0), (0, kstore.capacity - inputs.mask.shape[-1])))
    return qg, mask, inputs.codec.quantized_length(state)


def kernel_only_fn(inputs: DecodeInputs, cfg, kernel_options: dict):
    """(state, q) -> [B, 1, H, D]: the Pallas kernel over the packed stores and nothing else
    (no exact tokens, no XLA glue): isolates the kernel's time from the codec's overhead."""
    from pallas_kernels.decode_attention import combine, quantized_decode_partials

    if inputs.codec.pre_rope:
        raise ValueError("kernel-only timing covers codecs without pre-RoPE keys")

    def fn(state, q):
        qg, mask, n_q = _kernel_inputs(inputs, cfg, state, q)
        part = quantized_decode_partials(qg, state["k"], state["v"], mask, n_q, scale=cfg.head_dim ** -0.5,
                                         interpret=jax.default_backend() != "gpu", merge=False,
                                         **kernel_options)
        return combine([part]).reshape(q.shape).astype(q.dtype)

    return fn


def kernel_only_reference(inputs: DecodeInputs, cfg, q):
    from pallas_kernels.decode_attention import combine, quantized_decode_reference

    qg, mask, n_q = _kernel_inputs(inputs, cfg, inputs.state, q.astype(jnp.float32))
    part = quantized_decode_reference(qg, inputs.state["k"], inputs.state["v"], mask, n_q,
                                      scale=cfg.head_dim ** -0.5)
    return combine([part]).reshape(q.shape)


def reference_output(inputs: DecodeInputs, cfg, q):
    """fp32 attention over the cache as the codec stores it (dequantize, then attend)."""
    s = inputs.mask.shape[-1]
    codec = inputs.codec
    if isinstance(codec, IdentityCodec):
        k, v = inputs.state["k"], inputs.state["v"]
    else:
        k, v = codec.dense(inputs.state)
        k, v = k[:, :s], v[:, :s]
    k = k.astype(jnp.float32)
    if inputs.rotate_keys is not None:
        k = inputs.rotate_keys(k)
    return reference_attention(q.astype(jnp.float32), k, v.astype(jnp.float32), inputs.mask, cfg.head_dim ** -0.5)


def relative_error(out, ref) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def cache_read_bytes(inputs: DecodeInputs) -> int:
    """Bytes a decode step reads at least: the layer's whole state (the cache is exactly as
    long as the context, rounded up to the packing block)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(inputs.state))


def attention_calls(fn, q, calls: int):
    """(many, qs): `many(state, qs)` makes `calls` attention calls `fn(state, q)` in one jitted
    loop, each with a fresh query of qs (q nudged), and sums the outputs."""
    qs = q[None] + jnp.arange(calls, dtype=q.dtype)[:, None, None, None, None] * jnp.asarray(1e-3, q.dtype)
    return jax.jit(lambda state, qs: jax.lax.map(lambda x: fn(state, x), qs).sum(0)), qs


def time_attention(fn, state, q, calls: int, repeats: int) -> float:
    """Seconds per attention call in a `lax.map` loop (`attention_calls`), median of `repeats`
    runs: the harness of records up to run 13. It inflated XLA's bf16 baseline by a cost paid once
    an execution (kv_notes run 14); `attention_timing` times the calls as a decode step makes them."""
    many, qs = attention_calls(fn, q, calls)
    return median_seconds(many, state, qs, warmup=1, repeats=repeats) / calls


def attention_timing(fn, state, q, calls: int, repeats: int, breakdown: bool = False):
    """`pallas_kernels.autotune.Timing` of one attention call `fn(state, q)`: `calls` calls
    unrolled in one program, each with a fresh query, as a decode step's layers are: the wall
    clock a call (launch gaps included) and, on GPUs, the kernels' own time a call (CUPTI), with
    `breakdown` per kernel name."""
    from pallas_kernels.autotune import time_per_call

    qs = [q + jnp.asarray(1e-3 * i, q.dtype) for i in range(calls)]
    return time_per_call(lambda x, s: fn(s, x), qs, [state], reps=repeats, breakdown=breakdown)


def decode_writes(codec: KVCodec, context: int, state, fresh):
    """The layer state after decode steps writing fresh [2, steps, B, 1, K, D] (keys, values)
    one token a step at positions context, context + 1, ... (`prepare`, then `write`: the model's
    calls for one layer)."""
    batch = fresh.shape[2]

    def body(i, state):
        pos = jnp.full((batch, 1), context, jnp.int32) + i
        (state,) = codec.prepare((state,), context + i, 1)  # the step's due work, as the model does it
        return codec.write(state, fresh[0, i], fresh[1, i], context + i, pos)

    return jax.lax.fori_loop(0, fresh.shape[1], body, state)


def write_benchmark(cfg, codecs: dict[str, KVCodec], batch: int, context: int, steps: int = 32,
                    repeats: int = 5, log=print) -> list[dict]:
    """Rows of {cache, batch, context, us_per_write} for the bf16 cache and each codec: one
    decode step's cache write (one new token a row at position `context + i`, positions given as
    the model gives them) into a layer already holding `context` tokens. Timed as the difference
    between loops of 2 * `steps` and `steps` writes (medians of `repeats` runs), which cancels
    what a loop pays once (copying the state it was handed, which it may not update in place).
    KIVI's window flushes a group every group_size writes, so `steps` >= its group size includes
    the flush at its rate."""
    rows = []
    kvh, d = cfg.num_kv_heads, cfg.head_dim
    for name, codec in [("bf16", None)] + list(codecs.items()):
        inputs = filled_layer(cfg, codec, batch, context, context + 2 * steps)
        fresh = jax.random.normal(jax.random.key(2), (2, 2 * steps, batch, 1, kvh, d), jnp.bfloat16)
        many = jax.jit(functools.partial(decode_writes, inputs.codec, context))
        once, twice = (median_seconds(many, inputs.state, fresh[:, :n], warmup=1, repeats=repeats)
                       for n in (steps, 2 * steps))
        row = {"cache": name, "batch": batch, "context": context, "us_per_write": (twice - once) / steps * 1e6,
               "loop_us": {"steps": once * 1e6, "2 * steps": twice * 1e6}, "steps": steps}
        rows.append(row)
        if log:
            log(f"  {name:>24} batch {batch} ctx {context}: cache write {row['us_per_write']:.1f} us a step")
        del inputs
    return rows


def attention_benchmark(cfg, codecs: dict[str, KVCodec], batch: int, context: int, calls: int = 32,
                        repeats: int = 5, bandwidth: float | None = None, log=print,
                        kernel_variants: dict[str, dict] | None = None, kernel_only: bool = False,
                        on_row=None, loop: bool = True, extra_slots: int = 0) -> list[dict]:
    """Rows of {variant, batch, context, us, device_us, us_loop, kernels, bytes, GBps,
    roofline_fraction, rel_err, speedup_vs_xla_bf16, speedup_vs_pallas_bf16, device_speedup_vs_*}
    for the bf16 baselines and each codec (with each of `kernel_variants`: name -> kernel
    options, when given; with `kernel_only`, also each variant's kernel alone, checked against
    the dequantize-then-attend reference of the packed stores). `on_row(row)` sees each row as
    soon as it is measured.

    `us` is the wall clock a call of `calls` calls unrolled in one program (`attention_timing`,
    as a decode step makes them), `device_us` the kernels' own time a call (CUPTI; None off
    GPUs), `kernels` that time per kernel name. With `loop`, `us_loop` is the older harness's
    time a call (`time_attention`: the calls in a `lax.map` loop), kept so that records compare
    with earlier runs. `extra_slots`: cache slots past the context (a decode loop's cache holds the
    context and the tokens it will write; KIVI's store may round that up to whole tiles)."""
    bandwidth = bandwidth or copy_bandwidth()
    q = jax.random.normal(jax.random.key(1), (batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    rows = []
    slots = context + extra_slots
    dense = filled_layer(cfg, None, batch, context, slots)
    plans = [("xla-bf16", dense), ("pallas-bf16", dense)] + list(codecs.items())
    for name, plan in plans:
        inputs = plan if isinstance(plan, DecodeInputs) else filled_layer(cfg, plan, batch, context, slots)
        baseline = name in ("xla-bf16", "pallas-bf16")
        ref = reference_output(inputs, cfg, q)
        todo = [("", None, "codec")] if baseline or not kernel_variants else \
            [(suffix, options, "codec") for suffix, options in kernel_variants.items()]
        if kernel_only and not baseline and not getattr(plan, "pre_rope", False):
            todo += [(f"{suffix or 'default'}/kernel-only", options, "kernel-only")
                     for suffix, options in (kernel_variants or {"": None}).items()]
        kref = None
        for suffix, options, kind in todo:
            start = time.time()
            fn = attend_fn(inputs, cfg, name if baseline else kind, options)
            try:
                if kind == "kernel-only" and kref is None:
                    kref = kernel_only_reference(inputs, cfg, q)
                err = relative_error(jax.jit(fn)(inputs.state, q), kref if kind == "kernel-only" else ref)
                timing = attention_timing(fn, inputs.state, q, calls, repeats, breakdown=True)
                loop_us = time_attention(fn, inputs.state, q, calls, repeats) * 1e6 if loop else None
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                if log:
                    log(f"  {name + suffix:>14}: failed ({type(e).__name__}: {str(e)[:300]})")
                continue
            nbytes = cache_read_bytes(inputs)
            label = f"{name}/{suffix}" if suffix else name
            seconds = timing.wall_us * 1e-6
            row = {"variant": label, "batch": batch, "context": context, "slots": slots, "us": timing.wall_us,
                   "device_us": timing.device_us, "us_loop": loop_us, "kernels": timing.kernels,
                   "bytes": nbytes, "GBps": nbytes / seconds / 1e9, "roofline_fraction": nbytes / bandwidth / seconds,
                   "rel_err": err, "kernel_options": _jsonable(options), "setup_s": round(time.time() - start, 1)}
            rows.append(row)
            if on_row:
                on_row(row)
            if log:
                dev = "" if timing.device_us is None else f" ({timing.device_us:.1f} us of kernels)"
                log(f"  {label:>24} batch {batch} ctx {context}: {row['us']:9.1f} us{dev}, {row['GBps']:7.0f} GB/s "
                    f"({row['roofline_fraction']:.0%} of copy bw), rel err {err:.1e}, {row['setup_s']}s")
        del ref, kref
        if inputs is not dense:
            del inputs
    return add_speedups(rows)


def _jsonable(options: dict | None) -> dict | None:
    """Kernel options for a JSON record (a `Cw2Config` as its fields)."""
    if options is None:
        return None
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in options.items()}


def add_speedups(rows: list[dict]) -> list[dict]:
    """Each row's ratios to the bf16 baselines among `rows` (one batch, one run): wall clock
    (`speedup_vs_*`) and, where measured, the kernels' own time (`device_speedup_vs_*`)."""
    for key, prefix in (("us", "speedup"), ("device_us", "device_speedup")):
        for base_name in ("xla-bf16", "pallas-bf16"):
            base = next((r.get(key) for r in rows if r["variant"] == base_name), None)
            for r in rows:
                mine = r.get(key)
                r[f"{prefix}_vs_{base_name.replace('-', '_')}"] = base / mine if base and mine else None
    return rows


E2E_RUNS = 4  # decode loops e2e_decode runs on one cache: a warm-up and three timed


def e2e_setup(spec: str, recipe: str | None, batch: int = 1, steps: int = 32):
    """The loaded model (compressed by `recipe`: a name, then any `@section.key=value` overrides,
    e.g. `kivi_k2v2@kv_cache.flush_per_step=false`, then `+fused` to serve q|k|v and gate|up as
    one matmul each; `+fused` alone fuses the bf16 model; a last `+wgmma` repacks the 4-bit weights
    for the Hopper wgmma kernel), and `step_fn(context, donate) -> (run, args)`:
    `run(*args)` decodes `steps` tokens of every row over a cache already holding `context` tokens
    (random keys and values written through the codec), in the jitted loop `generate` uses.

    The cache has room for E2E_RUNS loops. donate=False: run returns the tokens, and every call
    starts from the same cache, which the loop then copies first (as a profile shows). donate=True:
    args = (cache, params, logits) and run returns (tokens, cache after the loop) and consumes the
    cache it is given, so the next call continues from there and nothing is copied, as in
    `generate`, which builds its cache inside the jitted function."""
    from flax import nnx

    from jaxcompress.experiments.recipes import apply_recipe, load_recipe
    from jaxcompress.io.load import load_model
    from jaxcompress.models.cache import KVCache
    from jaxcompress.models.generate import SamplingConfig, decode_loop

    loaded = load_model(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    recipe, wgmma = (recipe or "").removesuffix("+wgmma"), (recipe or "").endswith("+wgmma")
    recipe, fused = recipe.removesuffix("+fused"), recipe.endswith("+fused")
    if recipe:
        name, *overrides = recipe.split("@")
        loaded = apply_recipe(loaded, load_recipe(name, overrides))
    if fused:
        from jaxcompress.models.fuse import fuse_projections

        loaded = dataclasses.replace(loaded, model=fuse_projections(loaded.model)[0])
    if wgmma:
        from jaxcompress.models.repack import repack_for_wgmma

        loaded = dataclasses.replace(loaded, model=repack_for_wgmma(loaded.model)[0])
    cfg = loaded.config
    graphdef, params = nnx.split(loaded.model)
    sampling = SamplingConfig(max_new_tokens=steps)

    def step_fn(context: int, donate: bool = False):
        max_len = context + steps * E2E_RUNS
        layers = []
        for i in range(cfg.num_layers):  # one layer at a time: the transient stays small
            inputs = filled_layer(cfg, loaded.kv_codec, batch, context, max_len, seed=i, layer=i)
            layers.append(inputs.state)
        codec = loaded.kv_codec or IdentityCodec()
        slots = jnp.arange(max_len, dtype=jnp.int32)
        pos = jnp.broadcast_to(jnp.where(slots < context, slots, -1), (batch, max_len))
        cache = KVCache(tuple(layers), pos, jnp.int32(context), codec)

        def decode(cache, params, logits):
            m = nnx.merge(graphdef, params)
            next_pos = jnp.broadcast_to(cache.index, (batch,)).astype(jnp.int32)  # continue where it stands
            return decode_loop(m, logits, cache, next_pos, jax.random.key(0), (), sampling, return_cache=True)

        logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)
        if donate:
            run = jax.jit(lambda cache, params, logits: decode(cache, params, logits)[::2], donate_argnums=0)
            return run, (cache, params, logits)
        return jax.jit(lambda params, cache, logits: decode(cache, params, logits)[0]), (params, cache, logits)

    return loaded, step_fn


def e2e_decode(spec: str, recipe: str | None, contexts, batch: int = 1, steps: int = 32, log=print,
               on_row=None) -> list[dict]:
    """Decode tokens/s of `spec` (compressed by `recipe`) over caches already holding each
    context (see `e2e_setup`): the median of three loops of `steps` tokens, each continuing the
    cache the last one left (donated, so never copied)."""
    from jaxcompress.models.build import param_summary

    loaded, step_fn = e2e_setup(spec, recipe, batch, steps)
    weight_bytes = param_summary(loaded.model)["bytes"]
    rows = []
    for context in contexts:
        run, (cache, params, logits) = step_fn(context, donate=True)
        seconds, cache = median_carried_seconds(run, cache, params, logits, runs=E2E_RUNS)
        seconds /= steps
        row = {"model": spec, "recipe": recipe or "bf16", "batch": batch, "context": context,
               "ms_per_token": seconds * 1e3, "tokens_per_s": batch / seconds, "weight_bytes": weight_bytes,
               "steps": steps, "kv_kernel": {k: os.environ[k] for k in ("JAXCOMPRESS_KV_NUM_WARPS",) if k in os.environ}}
        rows.append(row)
        if on_row:
            on_row(row)
        if log:
            log(f"  {row['recipe']:>14} ctx {context}: {row['ms_per_token']:.2f} ms/step, "
                f"{row['tokens_per_s']:.1f} tok/s")
        del run, cache
    return rows
