"""The KV benchmark's pieces that run on any machine: the decode-step cache writes it times, and
`scripts/bench_kv.py --write` end to end (small shapes, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.kv import KIVICodec
from jaxcompress.kv.bench import decode_writes, filled_layer
from jaxcompress.models.presets import preset
from script_loader import load_script

SMOL = preset("smollm2-135m")  # 3 kv heads, head_dim 64


def _bench_kv_script():
    return load_script("scripts/bench_kv.py")


@pytest.mark.parametrize("codec", [None, KIVICodec(2, 2, group_size=32, residual=32)], ids=["bf16", "kivi"])
def test_decode_writes_put_each_token_at_its_position(codec):
    """80 decode-step writes after 256 tokens: every token lands at slot context + i. KIVI keeps
    the newest tokens exact in its window and has flushed the older ones (group by group) into
    the 2-bit store, within its grid's half step."""
    context, steps = 256, 80
    inputs = filled_layer(SMOL, codec, 2, context, context + steps, seed=0)
    fresh = jax.random.normal(jax.random.key(9), (2, steps, 2, 1, SMOL.num_kv_heads, SMOL.head_dim), jnp.bfloat16)
    state = jax.jit(lambda s, f: decode_writes(inputs.codec, context, s, f))(inputs.state, fresh)
    want_k = np.asarray(fresh[0, :, :, 0].astype(jnp.float32)).transpose(1, 0, 2, 3)  # [B, steps, K, D]
    if codec is None:
        got = np.asarray(state["k"][:, context:context + steps].astype(jnp.float32))
        np.testing.assert_array_equal(got, want_k)
        return
    assert int(state["end"]) == context + steps
    n_q = int(codec.quantized_length(state))
    assert n_q == context + 32  # a window of 32..63 tokens: one group of the new ones flushed
    dense_k, _ = codec.dense(state)
    got = np.asarray(dense_k[:, context:context + steps])
    exact = slice(n_q - context, steps)  # still in the window: exact
    np.testing.assert_array_equal(got[:, exact], want_k[:, exact])
    flushed = got[:, : n_q - context] - want_k[:, : n_q - context]
    span = want_k.max() - want_k.min()
    assert 0 < np.abs(flushed).max() <= span / 3 / 2 * 1.01  # 2 bits: 3 steps over a group's range


def test_bench_kv_write_table(tmp_path):
    """`bench_kv.py --write`: a record with one write row per cache and a markdown table."""
    bench_kv = _bench_kv_script()
    bench_kv.main(["--model", "smollm2-135m", "--no-attention", "--write", "--contexts", "256", "--batches", "1",
                   "--codecs", "kivi_k2v2", "--e2e-contexts", "256", "--repeats", "1", "--out", str(tmp_path)])
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("kv_bench_*.json") if "partial" not in p.name]
    assert [r["cache"] for r in record["writes"]] == ["bf16", "kivi_k2v2"]
    for r in record["writes"]:  # the difference of two timed loops (a CPU difference may be noise)
        loops = r["loop_us"]
        assert r["context"] == 256 and 0 < loops["steps"] and 0 < loops["2 * steps"]
        assert r["us_per_write"] == pytest.approx((loops["2 * steps"] - loops["steps"]) / r["steps"])
    (table,) = [p.read_text() for p in tmp_path.glob("kv_bench_*.md")]
    assert "Cache write per decode step" in table and "| kivi_k2v2 | 1 | 256 |" in table


def test_e2e_runs_continue_the_donated_cache():
    """bench_kv --e2e: each timed loop decodes `steps` more tokens into the cache the previous one
    left (donated: no copy of the cache per loop), at the next positions."""
    from jaxcompress.kv.bench import e2e_setup

    _, step_fn = e2e_setup("random:tiny", None, batch=2, steps=3)
    run, (cache, params, logits) = step_fn(16, donate=True)
    for n in (1, 2):
        _, cache = run(cache, params, logits)
        assert int(cache.index) == 16 + 3 * n
    np.testing.assert_array_equal(np.asarray(cache.positions[:, :22]), np.tile(np.arange(22), (2, 1)))
    assert (np.asarray(cache.positions[:, 22:]) == -1).all()


def test_e2e_recipe_overrides_and_fusion():
    """`name@section.key=value+fused`: the override reaches the codec, the projections are fused,
    and greedy decoding equals the unfused model's with the same codec."""
    from jaxcompress.kv.bench import e2e_setup

    tokens = {}
    for suffix in ("", "+fused"):
        loaded, step_fn = e2e_setup("random:tiny", "kivi_k2v2@kv_cache.flush_per_step=false@kv_cache.group_size=16" + suffix, steps=4)
        assert loaded.kv_codec.flush_per_step is False
        assert (loaded.model.layers[0].self_attn.qkv_proj is not None) == (suffix == "+fused")
        run, args = step_fn(40)
        tokens[suffix] = np.asarray(run(*args))
    np.testing.assert_array_equal(tokens["+fused"], tokens[""])


def test_bench_decode_script_record(tmp_path):
    """scripts/bench_decode.py (donated cache, three continuing loops, projections fused): one
    decode row per batch with its roofline, as the issue-5 records hold."""
    script = load_script("scripts/bench_decode.py")
    out = tmp_path / "decode.json"
    script.main(["--model", "random:tiny", "--batches", "1,2", "--steps", "3", "--context", "16", "--skip-prefill",
                 "--copy-mib", "16", "--fuse-projections", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["fused_projections"] is True
    assert [r["batch"] for r in record["decode"]] == [1, 2]
    for r in record["decode"]:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3)
        assert r["roofline_fraction"] == pytest.approx(r["roofline_ms"] / r["ms_per_step"])


def test_attention_benchmark_rows_and_table():
    """`attention_benchmark` on the CPU: every variant agrees with the float reference, is timed both
    ways (calls unrolled, and the older loop), and its ratios are the baselines' times over its own;
    the table renders them. The codec attends by its plain-JAX path: what is checked here is the
    benchmark, and the kernel in interpret mode costs a minute of compiles (its own tests run it)."""
    from jaxcompress.kv.bench import attention_benchmark

    bench_kv = _bench_kv_script()
    codec = KIVICodec(2, 2, group_size=32, residual=32, attention="reference")
    rows = attention_benchmark(SMOL, {"kivi": codec}, 1, 256, calls=2, repeats=1, bandwidth=1e11, log=None,
                               extra_slots=64)  # a decode loop's cache: 64 slots past the context, masked
    assert [r["variant"] for r in rows] == ["xla-bf16", "pallas-bf16", "kivi"]
    assert [r["slots"] for r in rows] == [320] * 3 and rows[0]["bytes"] == 2 * 320 * SMOL.num_kv_heads * SMOL.head_dim * 2
    xla = rows[0]["us"]
    for r in rows:
        assert r["us"] > 0 and r["us_loop"] > 0 and r["device_us"] is None  # no CUPTI on the CPU
        assert r["rel_err"] < 1e-2  # against attention over the cache as stored (bf16 / dequantized)
        assert r["speedup_vs_xla_bf16"] == pytest.approx(xla / r["us"])
        assert r["device_speedup_vs_xla_bf16"] is None
    table = bench_kv.markdown({"device": "cpu", "versions": {"jax": jax.__version__}, "git_commit": "x",
                               "model": "smollm2-135m", "copy_bandwidth_GBps": 100.0, "attention": rows})
    assert "| kivi | 1 | 256 |" in table and "kernels vs XLA bf16" in table


def test_kernel_variants_parse_the_cw2_option():
    """--kernel-variants items warps:stages:splits[:path[:cw2]]: vcN sets cw2's value channel rows,
    kz / nokz its keys pass's zero term, colN its tile width, kwN / vwN its warps, kpN its keys pass's
    prefetch steps, ki8 / ksN the int8 keys pass and its stages; anything else there
    is a clear error."""
    from pallas_kernels.decode_attention import Cw2Config

    bench_kv = _bench_kv_script()
    variants = bench_kv.parse_variants("4:2:0,4:2:6:auto:vc32")
    assert variants["w4-s2-xauto"] == {"num_warps": 4, "num_stages": 2, "num_splits": None, "path": "auto"}
    assert variants["w4-s2-x6-vc32"]["cw2"] == Cw2Config(value_channels=32)
    assert bench_kv.parse_variants("4:2:0:auto:vc16+kz")["w4-s2-xauto-vc16+kz"]["cw2"] == Cw2Config(16, keys_zero=True)
    assert bench_kv.parse_variants("4:2:0:auto:nokz")["w4-s2-xauto-nokz"]["cw2"] == Cw2Config(keys_zero=False)
    assert bench_kv.parse_variants("4:2:0:auto:col256+kw4+vw8")["w4-s2-xauto-col256+kw4+vw8"]["cw2"] == \
        Cw2Config(columns=256, key_warps=4, value_warps=8)
    assert bench_kv.parse_variants("4:2:0:auto:kp2")["w4-s2-xauto-kp2"]["cw2"] == Cw2Config(key_prefetch=2)
    assert bench_kv.parse_variants("4:2:0:cw2:ki8+ks3")["w4-s2-xauto-cw2-ki8+ks3"]["cw2"] == \
        Cw2Config(keys="int8", keys_stages=3)
    assert bench_kv.parse_variants("4:2:0:cw2:vx8+vmid2")["w4-s2-xauto-cw2-vx8+vmid2"]["cw2"] == \
        Cw2Config(values_splits=8, values_balanced=False)
    with pytest.raises(SystemExit, match="cw2 option 'zz2'"):
        bench_kv.parse_variants("4:2:0:auto:zz2")


def test_e2e_needs_a_process_of_its_own(capsys):
    """`--e2e` with the attention benchmark in the same process is refused (its rows measured 3-12%
    slow on the H100): a clear error naming --no-attention."""
    bench_kv = _bench_kv_script()
    with pytest.raises(SystemExit):
        bench_kv.main(["--e2e", "--contexts", "64"])
    assert "add --no-attention" in capsys.readouterr().err


def test_layout_probe_reads_every_word_once():
    """scripts/gpu/kv_layout_probe.py: both loads-only kernels (the store's order and the tiled
    copy) XOR exactly each split's words, uneven splits included (5 blocks over 2 splits)."""
    import jax
    import jax.numpy as jnp

    probe = load_script("scripts/gpu/kv_layout_probe.py")
    words = jax.random.randint(jax.random.key(0), (1, 2, 16, 5 * probe.COLUMNS), -2 ** 31, 2 ** 31 - 1, jnp.int32)
    want = probe.reference(words, 2)
    manual = jnp.stack([jnp.bitwise_xor.reduce(words[:, :, :, :3 * probe.COLUMNS].reshape(1, 2, -1, probe.COLUMNS), axis=2),
                        jnp.bitwise_xor.reduce(words[:, :, :, 3 * probe.COLUMNS:].reshape(1, 2, -1, probe.COLUMNS), axis=2)], 2)
    assert bool(jnp.array_equal(want, manual))
    for tiled in (False, True):
        got = probe.probe(probe.tile(words) if tiled else words, tiled=tiled, splits=2, interpret=True)
        assert bool(jnp.array_equal(got, want)), tiled


def test_e2e_recipe_wgmma_suffix():
    """`+fused+wgmma`: the suffixes are taken off the recipe name in order; the tiny model's
    projections (K = 64) are too narrow for the wgmma kernel's 128-column steps, so its 4-bit
    weights stay QArrays (repack_for_wgmma reports, never fails)."""
    from jaxcompress.kv.bench import e2e_setup
    from jaxcompress.quant.qarray import QArray

    loaded, _ = e2e_setup("random:tiny", "rtn_w4_g128@weights.group_size=32+fused+wgmma", steps=2)
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj.kernel.get_value(), QArray)
