"""The device-time profile (jaxcompress.bench.profile, scripts/profile_decode.py) on the CPU:
real jax.profiler traces, counted op by op."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxcompress.bench.profile import device_op_times, idle_gaps, profile_run, summarize, summarize_idle
from script_loader import load_script


def test_ops_of_a_loop_body_are_counted_once_per_iteration_and_the_loop_not_at_all():
    step = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ x), x))
    rows = device_op_times(step, jnp.ones((64, 64)))
    counts = {r["name"]: r["count"] for r in rows}
    assert not any(name.startswith("while") for name in counts)  # the parent is not counted
    assert any("tanh" in name and c == 5 for name, c in counts.items()), counts
    assert all(r["total_us"] >= 0 for r in rows) and sum(r["total_us"] for r in rows) > 0
    table = summarize(rows, steps=5, top=1)
    assert table.startswith("device time per step:") and "more ops" in table


def test_carried_profile_feeds_the_warm_up_output_to_a_loop_that_donates_its_first_argument():
    """A decode loop consumes its cache: the profiled call must take the cache the warm-up left
    (reusing the donated buffer is an error, and copying it would show in the trace)."""
    step = jax.jit(lambda c, y: (jnp.tanh(c @ y).sum(), c + y), donate_argnums=0)
    with pytest.raises(ValueError, match="donated"):
        device_op_times(step, jnp.ones((64, 64)), jnp.ones((64, 64)))
    rows = device_op_times(step, jnp.ones((64, 64)), jnp.ones((64, 64)), carried=True)
    assert any("add" in r["name"] for r in rows) and sum(r["total_us"] for r in rows) > 0, rows


def test_idle_gaps_hand_checked():
    """Three ops on a timeline (ns): a [0, 10), b [15, 25) overlapping c [20, 40), a again at
    [50, 60): span 60, busy 10 + 25 + 10 = 45, idle 15: 5 before b (after a), 10 before a
    (after c, the op that ended last)."""
    events = [("a", 0.0, 10e3), ("b", 15e3, 10e3), ("c", 20e3, 20e3), ("a", 50e3, 10e3)]
    t = idle_gaps(events)
    assert (t["span_us"], t["busy_us"], t["idle_us"]) == (60.0, 45.0, 15.0)
    assert t["gaps"] == [{"before": "a", "after": "c", "count": 1, "total_us": 10.0},
                         {"before": "b", "after": "a", "count": 1, "total_us": 5.0}]
    assert idle_gaps([])["span_us"] == 0.0


def test_a_host_pause_between_two_device_calls_is_idle_time_before_the_second():
    """A real trace: 50 ms of host sleep between two jitted calls shows as at least 50 ms of idle
    time, the longest gap, before the second call's first op."""
    import time

    f = jax.jit(lambda x: jnp.tanh(x @ x))
    g = jax.jit(lambda x: jnp.sin(x @ x) * 2.0)

    def step(x):
        y = jax.block_until_ready(f(x))
        time.sleep(0.05)
        return g(y)

    events = profile_run(step, jnp.ones((64, 64)))
    t = idle_gaps(events)
    assert t["idle_us"] >= 50e3 and abs(t["span_us"] - t["busy_us"] - t["idle_us"]) < 1e-6
    top = t["gaps"][0]
    assert top["total_us"] >= 50e3, t["gaps"][:3]
    assert summarize_idle(t, steps=1).startswith("timeline a step: span")


def test_profile_decode_script_writes_a_table_per_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the script appends to it: restore
    script = load_script("scripts/profile_decode.py")
    script.main(["--model", "random:tiny", "--recipes", "", "--context", "64", "--steps", "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "profile_bf16.json").read_text())
    assert record["steps"] == 2 and record["context"] == 64 and record["ops"]
    # two decode steps of a 2-layer model: each step's ops run at least once a step
    assert max(r["count"] for r in record["ops"]) >= 2
    assert "| op | calls / step | us / step | share |" in (tmp_path / "profile_bf16.md").read_text()
    timeline = record["timeline"]
    assert timeline["span_us"] >= timeline["busy_us"] > 0 and "idle before" in (tmp_path / "profile_bf16.md").read_text()


def test_profile_decode_attention_mode(tmp_path, monkeypatch):
    """--attention: one layer's decode attention, the calls counted per call (bf16 and KIVI-2)."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    script = load_script("scripts/profile_decode.py")
    script.main(["--attention", "--model", "smollm2-135m", "--recipes", ",kivi_k2v2", "--context", "256",
                 "--steps", "3", "--out", str(tmp_path)])
    for name in ("xla-bf16", "kivi_k2v2"):
        record = json.loads((tmp_path / f"profile_{name}.json").read_text())
        assert record["attention_only"] and record["steps"] == 3
        assert max(r["count"] for r in record["ops"]) >= 3  # each call's ops run once a call
