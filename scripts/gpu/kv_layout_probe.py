"""Does the KV store's access pattern hold the cw2 keys pass at ~2.1 TB/s? (issue 6, kv_notes run 15)

Two loads-only Pallas kernels read the same 2-bit key words at Llama-2-7B head shapes (32 kv heads
of 128 channels, 32k tokens), on the keys pass's grid (batch, kv head, split) with its blocks of
128 word columns:
- native: the channel_words store as the keys pass reads it, 512 B from each of 128 channel rows
  8 KB apart a block;
- tiled: a copy in which each block's [128 rows, 128 words] are contiguous (64 KB).
Each XORs its words into one word a lane (nothing can be dropped) and writes that. CUPTI time a
call and bandwidth. A tiled store would pay only if `tiled` reads clearly faster than `native`.

    PYTHONPATH=. JAX_PLATFORMS=cuda python scripts/gpu/kv_layout_probe.py --out $OUT/probe
    python scripts/gpu/kv_layout_probe.py --interpret --context 4096 --batches 1   # a CPU check
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

COLUMNS = 128  # word columns a block (the keys pass's KEY_COLUMNS)
STEP = 8       # channel rows a step (KEY_ROWS_F16), loaded together


def _probe_kernel(w_ref, o_ref, *, tiled: bool, rows: int, blocks_per_split: int, n_blocks: int):
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, n_blocks)

    def block(blk, acc):
        def step(ci, acc):
            for rr in range(STEP):
                r = ci * STEP + rr
                acc = acc ^ (w_ref[blk, r, :] if tiled else w_ref[r, pl.ds(blk * COLUMNS, COLUMNS)])
            return acc
        return lax.fori_loop(0, rows // STEP, step, acc)

    o_ref[...] = lax.fori_loop(first, last, block, jnp.zeros((COLUMNS,), jnp.int32))


def tile(words: jax.Array) -> jax.Array:
    """[B, K, D, W] -> [B, K, W / COLUMNS, D, COLUMNS]: each block's rows contiguous."""
    b, k, d, w = words.shape
    return jnp.moveaxis(words.reshape(b, k, d, w // COLUMNS, COLUMNS), 3, 2)


@functools.partial(jax.jit, static_argnames=("tiled", "splits", "interpret"))
def probe(words: jax.Array, *, tiled: bool, splits: int, interpret: bool = False) -> jax.Array:
    """XOR of each split's words a lane [B, K, splits, COLUMNS]; `words` native [B, K, D, W] or tiled."""
    b, k = words.shape[:2]
    d = words.shape[3] if tiled else words.shape[2]
    n_blocks = words.shape[2] if tiled else words.shape[3] // COLUMNS
    per = -(-n_blocks // splits)
    block = (None, None) + words.shape[2:]
    kernel = functools.partial(_probe_kernel, tiled=tiled, rows=d, blocks_per_split=per, n_blocks=n_blocks)
    from pallas_kernels.decode_attention import _compiler_params

    return pl.pallas_call(
        kernel,
        grid=(b, k, splits),
        in_specs=[pl.BlockSpec(block, lambda i, h, j: (i, h) + (0,) * (len(block) - 2))],
        out_specs=pl.BlockSpec((None, None, None, COLUMNS), lambda i, h, j: (i, h, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, k, splits, COLUMNS), jnp.int32),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(4, 2),
        name="kv_probe_tiled" if tiled else "kv_probe_native",
    )(words)


def reference(words: jax.Array, splits: int) -> jax.Array:
    """The same XORs in plain JAX (native layout)."""
    b, k, d, w = words.shape
    n_blocks = w // COLUMNS
    per = -(-n_blocks // splits)
    x = words.reshape(b, k, d, n_blocks, COLUMNS)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, per * splits - n_blocks), (0, 0)))
    x = x.reshape(b, k, d, splits, per, COLUMNS)
    return lax.reduce(x, jnp.int32(0), lax.bitwise_xor, (2, 4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--interpret", action="store_true", help="run on the CPU in interpret mode (a check)")
    args = ap.parse_args(argv)

    from jaxcompress.io.atomic import write_json
    from jaxcompress.provenance import provenance
    from pallas_kernels import autotune
    from pallas_kernels.decode_attention import TARGET_PROGRAMS, _splits

    kv_heads, d, c = 32, 128, 16  # Llama-2-7B heads, 2-bit codes: 16 a word
    rows = []
    for batch in map(int, args.batches.split(",")):
        words = jax.random.randint(jax.random.key(batch), (batch, kv_heads, d, args.context // c), -2 ** 31,
                                   2 ** 31 - 1, jnp.int32)
        n_blocks = words.shape[3] // COLUMNS
        splits, _ = _splits(batch, kv_heads, n_blocks, None, TARGET_PROGRAMS)
        want = reference(words, splits)
        for tiled in (False, True):
            w = tile(words) if tiled else words
            got = probe(w, tiled=tiled, splits=splits, interpret=args.interpret)
            assert bool(jnp.array_equal(got, want)), f"probe {'tiled' if tiled else 'native'} batch {batch} is wrong"
            row = {"layout": "tiled" if tiled else "native", "batch": batch, "context": args.context,
                   "splits": splits, "bytes": int(w.nbytes)}
            if not args.interpret:
                def fn(x, w, tiled=tiled):  # x enters each call's output: no two calls are alike
                    return probe(w, tiled=tiled, splits=splits) ^ x

                t = autotune.time_per_call(fn, [jnp.full((1,), i, jnp.int32) for i in range(8)], [w, w + 1],
                                           breakdown=True)
                row.update(wall_us=t.wall_us, device_us=t.device_us, kernels=t.kernels,
                           TBps=None if t.device_us is None else w.nbytes / t.device_us / 1e6)
            rows.append(row)
            print(row, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "kv_layout_probe.json"), {**provenance(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
