"""Cache eviction hints for the kernels' loads (Triton's `eviction_policy`).

A decode step reads each weight code and each packed key and value once. Hinted `evict_first`,
those streams stop pushing the data that is read again (x, the scales, the attention scores) out
of the L2. On an H100 the W4 GEMV ran 3-12% faster with its codes hinted (31 of 32 configs,
docs/results/kernel_notes.md, run 10). KIVI's two-pass decode kernel (cw2) takes the hint as
its `eviction` option (docs/results/kv_notes.md, run 13); the dense bf16 decode kernel measured
no change from it across processes and is left unhinted.
"""

from __future__ import annotations

import dataclasses

from jax.experimental.pallas import triton as plgpu

from jaxcompress.errors import ConfigError

POLICIES = ("evict_first", "evict_last")


@dataclasses.dataclass(frozen=True)
class LoadHints:
    """Eviction policies of the weight GEMV's loads (None: no hint). `groups` (scales, zero
    points) and `x` are left unhinted by default; the benchmark times them."""

    codes: str | None = "evict_first"
    groups: str | None = None
    x: str | None = None


NO_HINTS = LoadHints(codes=None)


def hinted_load(view, policy: str | None):
    """`view[...]` of a ref view (`ref.at[...]`), with an eviction policy when one is given."""
    if policy is not None and policy not in POLICIES:
        raise ConfigError(f"eviction policy {policy!r} must be one of {POLICIES} or None")
    return plgpu.load(view, eviction_policy=policy) if policy else view[...]
