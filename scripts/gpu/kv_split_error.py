"""Error of cw2's decode against the float reference by split count, on the GPU (kv_notes run 24).

On an H200, KIVI-2 at 32k with Llama-2-7B heads, `bench_kv.py` measured the codec path's error rise
from 1.7e-3 at 3 splits to 6.1e-3 at 2 and 8.3e-3 at 1 (batch 8), while the kernels' plain-JAX models
on the CPU stay at 6e-4 for 1 to 16 splits. This times nothing: it runs the decode at each
--splits with each values pass (--values), and prints the relative error of the output, and of each
split's normalized output and log-sum-exp against the reference over that split's tokens: an error in
the scores shows in both, one in the values pass's sums in the normalized output only.

    python scripts/gpu/kv_split_error.py --batch 1 --splits 2,16 --values wgmma,cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcompress.kv import KIVICodec  # noqa: E402
from jaxcompress.kv.bench import filled_layer, relative_error  # noqa: E402
from jaxcompress.kv.store import codes_per_word  # noqa: E402
from jaxcompress.models.presets import preset  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--splits", default="2,16")
    ap.add_argument("--values", default="wgmma,cuda")
    ap.add_argument("--keys", default="cuda")
    ap.add_argument("--balanced", default="1", help="Cw2Config.values_balanced settings to run, e.g. 0,1 (0: codes less 2)")
    ap.add_argument("--kv-heads", type=int, default=0, help="fewer kv heads than Llama-2-7B's 32 (a CPU check)")
    ap.add_argument("--interpret", action="store_true", help="the kernels' CPU models (interpret mode)")
    args = ap.parse_args()
    cfg = preset("llama2-7b")
    if args.kv_heads:
        cfg = dataclasses.replace(cfg, num_kv_heads=args.kv_heads, num_heads=args.kv_heads)
    inputs = filled_layer(cfg, KIVICodec(2, 2), args.batch, args.context, seed=0)
    k, v = inputs.state["k"], inputs.state["v"]
    q = jax.random.normal(jax.random.key(1), (args.batch, cfg.num_kv_heads, 1, cfg.head_dim), jnp.float32)
    mask = jnp.ones((args.batch, k.capacity), bool)
    scale = cfg.head_dim ** -0.5
    want = da.combine([da.quantized_decode_reference(q, k, v, mask, args.context, scale=scale)])
    block = da._key_columns(k) * codes_per_word(k.bits)  # cw2's blocks (code order permutes inside one)
    n_blocks = k.capacity // block
    for values, balanced in ((v, int(b)) for v in args.values.split(",") for b in args.balanced.split(",")):
        if balanced and values != "wgmma":
            continue
        for splits in (int(s) for s in args.splits.split(",")):
            config = da.Cw2Config(values=values, keys=args.keys, values_balanced=bool(balanced))
            part = da.quantized_decode_partials(q, k, v, mask, args.context, scale=scale, path="cw2",
                                                num_splits=splits, cw2=config, merge=False, interpret=args.interpret)
            got = da.combine([part])
            n_splits, per_split = da._splits(args.batch, cfg.num_kv_heads, n_blocks, splits)
            worst_o = worst_lse = 0.0
            for j in range(n_splits):  # each split against the reference over its own tokens
                tokens = jnp.arange(k.capacity) // block // per_split == j
                ref = da.quantized_decode_reference(q, k, v, mask & tokens[None], args.context, scale=scale)
                o_k, l_k, m_k = part.o[:, :, j], part.l[:, :, j], part.m[:, :, j]
                worst_o = max(worst_o, relative_error(o_k / l_k[..., None], ref.o / ref.l[..., None]))
                lse = lambda l, m: jnp.log(l) + m  # noqa: E731
                worst_lse = max(worst_lse, float(jnp.max(jnp.abs(lse(l_k, m_k) - lse(ref.l, ref.m)))))
            print(f"values={values}{'+balanced' if balanced else ''} keys={args.keys} splits={n_splits} ({per_split} blocks): output rel err "
                  f"{relative_error(got, want):.2e}; worst split: normalized o rel err {worst_o:.2e}, "
                  f"log-sum-exp abs err {worst_lse:.2e}; finite {bool(jnp.isfinite(got).all())}", flush=True)

if __name__ == "__main__":
    main()
