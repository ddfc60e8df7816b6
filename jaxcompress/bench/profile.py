"""Where a jitted step spends its device time: kernel times from a `jax.profiler` trace.

`device_op_times(fn, *args)` runs `fn` once under the profiler (after a warm-up call) and sums
the device time of every op the trace records, by name. On a GPU these are the kernels XLA and
Pallas launch (the events of the device plane's stream lines); on the CPU, XLA's thunks (the
events that carry an `hlo_op`). The table answers "which kernels make up a decode step", which
wall-clock medians cannot.

`idle_gaps` reads the same trace as a timeline: the time between the first op and the last
that no op covers (the device waiting on the host: launches, host round trips), and which op
each gap came before. A step whose wall time exceeds its kernels' sum is explained there.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax

from jaxcompress.errors import UserError


def _device_lines(planes):
    """Lines whose events are device ops: a GPU's stream lines (its "XLA Ops" lines repeat them
    by op), or, without a GPU, every line (op_table keeps the events that carry an hlo_op)."""
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    if gpu:
        return [line for p in gpu for line in p.lines if line.name.startswith("Stream")]
    return [line for p in planes for line in p.lines]


def device_events(xplane_path: str) -> list[tuple[str, float, float]]:
    """(name, start_ns, duration_ns) of every device op in a saved trace, by start."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    ops = []
    for line in _device_lines(list(data.planes)):
        events = [e for e in line.events if line.name.startswith("Stream") or "hlo_op" in dict(e.stats)]
        events.sort(key=lambda e: e.start_ns)
        nested = not line.name.startswith("Stream")  # GPU kernels overlap (programmatic dependent launch)
        for i, event in enumerate(events):
            if nested and i + 1 < len(events) and events[i + 1].start_ns < event.start_ns + event.duration_ns:
                continue  # a parent (a CPU while loop around its body's thunks): count the leaves
            ops.append((event.name, float(event.start_ns), float(event.duration_ns)))
    return sorted(ops, key=lambda e: e[1])


def op_table(events: list[tuple[str, float, float]]) -> list[dict]:
    """[{name, count, total_us}] of `device_events`, longest total first."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, _, duration in events:
        totals[name][0] += 1
        totals[name][1] += duration / 1e3
    rows = [{"name": name, "count": c, "total_us": us} for name, (c, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["total_us"])


def idle_gaps(events: list[tuple[str, float, float]]) -> dict:
    """The timeline of `device_events`: span_us (first start to last end), busy_us (covered by
    some op, overlaps counted once), idle_us = span - busy, and `gaps`: [{before, after, count,
    total_us}], the idle time before each op name (after the op that ended last), longest first."""
    if not events:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    totals: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0])
    busy, covered_to, last = 0.0, events[0][1], events[0][0]
    for name, start, duration in events:
        end = start + duration
        if start > covered_to:
            entry = totals[(name, last)]
            entry[0] += 1
            entry[1] += (start - covered_to) / 1e3
        busy += max(0.0, end - max(start, covered_to))
        if end >= covered_to:
            covered_to, last = end, name
    span = (covered_to - events[0][1]) / 1e3
    gaps = [{"before": b, "after": a, "count": c, "total_us": us} for (b, a), (c, us) in totals.items()]
    return {"span_us": span, "busy_us": busy / 1e3, "idle_us": span - busy / 1e3,
            "gaps": sorted(gaps, key=lambda r: -r["total_us"])}


def device_op_times(fn, *args, trace_dir: str | None = None, carried: bool = False) -> list[dict]:
    """`op_table` of one profiled run of `fn(*args)` (see `profile_run`)."""
    return op_table(profile_run(fn, *args, trace_dir=trace_dir, carried=carried))


def profile_run(fn, *args, trace_dir: str | None = None, carried: bool = False) -> list[tuple[str, float, float]]:
    """Runs `fn(*args)` once to compile and warm up, then once under the profiler; returns
    `device_events` of that run. `trace_dir` keeps the trace (a temporary folder otherwise).

    carried=True: `fn` donates its first argument and returns (output, its next value), as a
    decode loop that consumes its cache does; the profiled call takes what the warm-up left, so
    the trace shows the step as served, without the copy a reused donated buffer would force."""
    out = jax.block_until_ready(fn(*args))
    if carried:
        args = (out[1], *args[1:])
    with tempfile.TemporaryDirectory() as tmp:
        folder = trace_dir or tmp
        jax.profiler.start_trace(folder)
        try:
            jax.block_until_ready(fn(*args))
        finally:
            jax.profiler.stop_trace()
        paths = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not paths:
            raise UserError(f"the profiler wrote no trace under {folder}; is another trace running?")
        return device_events(paths[-1])


def summarize_idle(timeline: dict, steps: int, top: int = 10) -> str:
    """A markdown summary of `idle_gaps`: span, busy and idle time a step, and the longest gaps."""
    lines = [f"timeline a step: span {timeline['span_us'] / steps:.1f} us, ops busy {timeline['busy_us'] / steps:.1f} us, "
             f"idle {timeline['idle_us'] / steps:.1f} us ({timeline['idle_us'] / max(timeline['span_us'], 1e-9):.1%})",
             "", "| idle before | after | gaps / step | us / step |", "|---|---|---|---|"]
    for r in timeline["gaps"][:top]:
        lines.append(f"| `{r['before'][:60]}` | `{r['after'][:60]}` | {r['count'] / steps:.1f} | {r['total_us'] / steps:.1f} |")
    return "\n".join(lines)


def summarize(rows: list[dict], steps: int, top: int = 25) -> str:
    """A markdown table of the `top` ops: calls and microseconds per step, share of the total."""
    total = sum(r["total_us"] for r in rows) or 1.0
    lines = [f"device time per step: {total / steps:.1f} us over {sum(r['count'] for r in rows) / steps:.0f} "
             f"ops ({steps} steps)", "", "| op | calls / step | us / step | share |", "|---|---|---|---|"]
    for r in rows[:top]:
        lines.append(f"| `{r['name'][:90]}` | {r['count'] / steps:.1f} | {r['total_us'] / steps:.1f} | "
                     f"{r['total_us'] / total:.1%} |")
    rest = rows[top:]
    if rest:
        lines.append(f"| ({len(rest)} more ops) | {sum(r['count'] for r in rest) / steps:.1f} | "
                     f"{sum(r['total_us'] for r in rest) / steps:.1f} | "
                     f"{sum(r['total_us'] for r in rest) / total:.1%} |")
    return "\n".join(lines)
