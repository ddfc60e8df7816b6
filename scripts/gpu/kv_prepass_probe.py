"""Times the int8 keys pass's prepass (`kv_keys_int8.prepass`) on a GPU, per configuration, beside the
XLA ops it stands in for: its plain-JAX model (`prepare`) and the default path's q . zero einsum (the
only read of the key zero points the f16x2 path makes outside its kernels).

    PYTHONPATH=. python scripts/gpu/kv_prepass_probe.py --batches 1,8 --configs 4:4,8:4 --out probe.json

A configuration is steps_per_program:warps (kv_notes run 23 also timed two other orientations of the
prepass kernel, since removed: commit 2d76406 holds all three). CUPTI kernel time a call (the inputs cycled through
buffers larger than the L2), on random Llama-2-7B-shaped KIVI-2 key stores at 32k tokens."""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.kv.store import QTokens
from pallas_kernels import autotune
from pallas_kernels import decode_attention as da
from pallas_kernels import kv_keys_int8 as kk


def key_store(rng, batch: int, kv_heads: int, tokens: int, token_group: int = 32) -> QTokens:
    words = jnp.asarray(rng.integers(-2 ** 31, 2 ** 31, size=(batch, kv_heads, 128, tokens // 16), dtype=np.int64)
                        .astype(np.int32)).view(jnp.uint32)
    meta = lambda: jnp.asarray(rng.uniform(0.2, 1.5, size=(batch, kv_heads, 128, tokens // token_group))  # noqa: E731
                               .astype(np.float16))
    return QTokens(words, meta(), meta(), bits=2, token_group=token_group, channel_group=1, layout="channel_words")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--configs", default="4:4")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(x) for x in args.batches.split(",")):
        k = key_store(rng, batch, 32, args.tokens)
        buffers = autotune.buffers_for(k.codes.nbytes + 2 * k.scale.nbytes)
        ws = [k] + [jax.tree.map(lambda x: x + 0, k) for _ in range(buffers - 1)]
        xs = [jnp.asarray(rng.normal(size=(batch, 32, 1, 128)).astype(np.float32)) for _ in range(2 * buffers)]
        scale = 128 ** -0.5
        want = kk.prepare(xs[0], k, scale=scale)
        fns = {"xla prepare": lambda q, k: kk.prepare(q, k, scale=scale),
               "xla q.zero einsum": lambda q, k: da._cw_inputs(q, k, jnp.ones((q.shape[0], k.capacity), bool), k.capacity,
                                                               scale, centred=True, mid_in_kernel=True)[1]}
        for cfg in args.configs.split(","):
            steps, warps = cfg.split(":")
            fns[f"prepass {cfg}"] = (lambda q, k, steps=int(steps), warps=int(warps):
                                     kk.prepass(q, k, scale=scale, steps_per_program=steps, warps=warps))
        for name, fn in fns.items():
            row = dict(batch=batch, name=name)
            try:
                if name.startswith("prepass"):
                    got = kk.from_prepass(*jax.jit(fn)(xs[0], k))
                    row["b_mismatch"] = float(jnp.mean(got[0] != want[0]))
                t = autotune.time_per_call(fn, xs, ws, breakdown=True)
                row.update(us=t.device_us, wall_us=t.wall_us,
                           kernels={n: v for n, v in (t.kernels or {}).items() if not n.startswith("_")})
            except Exception as e:  # a configuration that does not compile: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row)[:400], flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=os.environ.get("JAXCOMPRESS_GIT_COMMIT"),
                tokens=args.tokens, kv_heads=32, head_dim=128, token_group=32)
    with open(args.out + ".tmp", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("| batch | what | us (CUPTI) | B mismatch |")
    for r in rows:
        print(f"| {r['batch']} | {r['name']} | {r.get('us') and round(r['us'], 1)} | {r.get('b_mismatch', '-')} | {r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
