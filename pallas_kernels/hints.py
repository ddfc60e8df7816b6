"""Cache eviction hints for the kernels' loads (Triton's `eviction_policy`).

A decode step reads each weight code and each cached key and value once. Hinted `evict_first`,
those streams stop pushing the data that is read again (x, the scales, the attention scores) out
of the L2: the W4 GEMV ran 3-12% faster on an H100 with its codes hinted (31 of 32 configs,
docs/results/kernel_notes.md, run 10).
"""

from __future__ import annotations

import dataclasses
import os

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


def stream_policy(env: str = "JAXCOMPRESS_KV_EVICTION") -> str | None:
    """The policy of read-once streams (cached keys and values), read when a kernel is traced:
    `evict_first` unless `$JAXCOMPRESS_KV_EVICTION` says `none` (benchmark A/B runs)."""
    raw = os.environ.get(env, "evict_first")
    if raw == "none":
        return None
    if raw not in POLICIES:
        raise ConfigError(f"${env}={raw!r} must be one of {POLICIES} or 'none'")
    return raw
