"""How much of the tensor-core values pass's sum leans one way, on the CPU (kv_notes run 24).

The wgmma values pass (`pallas_kernels/kv_values_wgmma.py`) sums T = sum_t B_t (code_t - mid) on the
tensor cores, B = p x scale, and adds the zero-point term sum_t p_t (zero_t + mid scale_t) in fp32.
With mid = 2 the codes' mean (1.5 for uniform 2-bit codes) leaves T a part that grows with the
tokens, which the zero-point term cancels: a relative error rho of T becomes rho |T| / |o| of the
output o. This prints |T| / |o| on a random KIVI-2 layer (one head, Llama-2's head_dim) for mid = 2
and for `slot_mids(balanced=True)`, and the rho the H200's measured errors imply for mid = 2.

    python scripts/kv_values_coherence.py --context 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcompress.kv import KIVICodec  # noqa: E402
from jaxcompress.kv.bench import filled_layer  # noqa: E402
from jaxcompress.models.presets import preset  # noqa: E402
from pallas_kernels.kv_values_wgmma import SLOTS, slot_mids  # noqa: E402

# kv_notes run 24 (H200, `scripts/gpu/kv_split_error.py`, batch 1, 32 kv heads): output error of the
# wgmma values pass with one split of these many tokens
MEASURED = {2048: 2.0e-3, 32768: 8.6e-3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--lengths", default="2048,32768", help="split lengths (tokens) to report")
    args = ap.parse_args()
    cfg = dataclasses.replace(preset("llama2-7b"), num_kv_heads=1, num_heads=1)
    layer = filled_layer(cfg, KIVICodec(2, 2), 1, args.context, seed=0)
    k = np.asarray(layer.state["k"].dequantize(), np.float64)[0, 0]  # [S, D]
    v = layer.state["v"]
    groups = v.head_dim // v.channel_group
    values = np.asarray(v.dequantize(), np.float64)[0, 0].reshape(args.context, groups, -1)
    lo, hi = values.min(-1, keepdims=True), values.max(-1, keepdims=True)
    scale = (hi - lo) / 3  # KIVI-2's per-token grid: value = code x scale + min
    codes = np.rint((values - lo) / np.where(scale > 0, scale, 1)).clip(0, 3)
    q = np.asarray(jax.random.normal(jax.random.key(1), (cfg.head_dim,), jnp.float32), np.float64)
    scores = k @ q / np.sqrt(cfg.head_dim)
    for n in (int(x) for x in args.lengths.split(",")):
        p = np.exp(scores[:n] - scores[:n].max())[:, None, None]
        out = np.linalg.norm((p * values[:n]).sum(0))
        lean = {}
        for name, mids in (("mid 2", slot_mids(False)), ("balanced", slot_mids(True))):
            mid = mids[np.arange(n) % SLOTS][:, None, None]  # channel_words: 16 tokens a word, slot = token % 16
            lean[name] = np.linalg.norm((p * scale[:n] * (codes[:n] - mid)).sum(0)) / out
        rho = f", implied rho {MEASURED[n] / lean['mid 2']:.1e}" if n in MEASURED else ""
        print(f"{n} tokens: |T| / |o| {lean['mid 2']:.1f} with mid 2, {lean['balanced']:.1f} balanced{rho}")


if __name__ == "__main__":
    main()
