"""Timing on accelerators: warm up, then the median of repeated, synchronised runs."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` with the result synchronised (`block_until_ready`)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_carried_seconds(fn, carry, *args, runs: int = 4) -> tuple[float, object]:
    """Median wall time of `fn(carry, *args) -> (out, carry)` over `runs` - 1 calls after a
    warm-up, each call given the carry the last one returned (donate it in `fn`: a decode loop
    then updates its cache in place instead of copying it every call). Returns (seconds, carry)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _, carry = jax.block_until_ready(fn(carry, *args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), carry


def copy_bandwidth(nbytes: int = 2 << 30, passes: int = 8, repeats: int = 5) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    `passes` read-modify-write sweeps run inside one jitted loop, so dispatch overhead does not
    count against the memory system.
    """
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)

    @jax.jit
    def sweeps(a):
        return jax.lax.fori_loop(0, passes, lambda _, v: v * 1.0001, a)

    seconds = median_seconds(sweeps, x, repeats=repeats)
    return passes * 2 * x.size * 4 / seconds
