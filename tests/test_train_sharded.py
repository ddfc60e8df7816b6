"""Sharded training on 8 fake CPU devices: LoRA steps over quantized and dense bases on a (data,
fsdp, tensor) mesh equal the same steps on one device, and update only the adapters; every kind
of leaf is laid out on the mesh as its weight; a batch that does not divide the data axes is a clear error.

XLA fixes the number of CPU devices when JAX starts, so `test_on_8_fake_devices` runs this file
again in a fresh interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=8; the
`test_inner_*` tests run only there.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

INNER = os.environ.get("JAXCOMPRESS_TEST_8_DEVICES") == "1"
inner = pytest.mark.skipif(not INNER, reason="runs inside test_on_8_fake_devices (8 fake CPU devices)")


def test_on_8_fake_devices():
    if INNER:
        pytest.skip("this is the inner run")
    env = dict(os.environ, JAXCOMPRESS_TEST_8_DEVICES="1", JAX_PLATFORMS="cpu",
               # Unoptimised LLVM code halves compile time; both sides of each comparison use it.
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "inner"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.split("\n")[-2], proc.stdout[-2000:]


# ------------------------------------------------------------------------------ inner tests
def _config(mode, **over):
    from jaxcompress.train.config import TrainConfig, parse

    raw = {"mode": mode, "model": "numpy:tiny1", "steps": 4, "batch_size": 8, "compute_dtype": "float32",
           "param_dtype": "float32", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
           "quant": {"bits": 4, "group_size": 32}, "qat": {"scales": "learned"},
           "optim": {"lr": 1e-2, "accum_steps": 2, "weight_decay": 0.01},
           "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}
    raw.update(over)
    return parse(TrainConfig, raw)


def _batch(seed=0, accum=2, b=8, length=16, vocab=512):
    rng = np.random.default_rng(seed)
    positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
    positions[1, 10:] = -1  # some padding
    return [{"tokens": rng.integers(0, vocab, (b, length)).astype(np.int32),
             "targets": rng.integers(0, vocab, (b, length)).astype(np.int32),
             "weights": (positions >= 0).astype(np.float32) * (rng.random((b, length)) > 0.2),
             "positions": positions} for _ in range(accum)]


def _trainer(cfg, devices):
    import jax

    from jaxcompress.train.sharding import sharder_from_config
    from jaxcompress.train.trainer import Trainer
    from test_train_common import numpy_model

    if len(devices) == 1:
        cfg = cfg.__class__(**{**cfg.__dict__, "mesh": cfg.mesh.__class__(data=1, fsdp=1, tensor=1)})
    assert jax.device_count() == 8
    return Trainer(cfg, numpy_model(seed=0), cfg.steps, sharder_from_config(cfg.mesh, devices))


# The MLP projections get a quantized (QArray) base, the attention projections keep their dense
# base: one comparison covers LoRA on both kinds of base.
MLP_ONLY = r"layers\.\d+\.mlp\.(gate|up|down)_proj\.kernel"


def _compare(cfg, micro_batches=(2, 2)):
    """One step per entry of `micro_batches` (micro-batches accumulated in the step) on one device
    and on the 2x2x2 mesh; asserts equal metrics, parameters and Adam state; returns both
    trainers and a snapshot of the frozen weights before the steps. (Each distinct count is a
    program to compile, ~30 s on a CI machine, so the test keeps to the accumulation loop.)"""
    import jax

    one, eight = _trainer(cfg, jax.devices()[:1]), _trainer(cfg, jax.devices())
    frozen_before = {n: np.asarray(v) for n, v in one.frozen.items()}
    for step, accum in enumerate(micro_batches):
        m1, m8 = one.step(_batch(step, accum)), eight.step(_batch(step, accum))
        for key in ("loss", "grad_norm", "tokens", "target_tokens"):
            np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=2e-5, err_msg=f"step {step} {key}")
    for name in one.state.trainable:
        np.testing.assert_allclose(np.asarray(eight.state.trainable[name]), np.asarray(one.state.trainable[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(one.state.opt_state), jax.tree_util.tree_leaves(eight.state.opt_state)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    return one, eight, frozen_before


@inner
def test_inner_lora_and_qlora_sharded_steps_equal_unsharded_and_only_adapters_move():
    # Adam's update g / (sqrt(v) + eps) is scale-free: for an entry whose gradient is ~eps, the
    # summation-order noise of a reduction decides its sign. A large eps keeps the update linear
    # in small gradients, so the parameters compare as tightly as the gradients do.
    cfg = _config("qlora", optim={"lr": 1e-2, "eps": 1e-3, "accum_steps": 2, "weight_decay": 0.01},
                  quant={"bits": 4, "group_size": 32, "targets": MLP_ONLY})
    one, eight, frozen_before = _compare(cfg)  # with LoRA dropout
    assert all(n.endswith((".a", ".b")) for n in one.state.trainable)  # only adapters are trainable
    assert any(n.endswith("mlp.up_proj.kernel.base.codes") for n in one.frozen)  # a QArray base
    assert "layers.0.self_attn.q_proj.kernel.base" in one.frozen  # and a dense one
    for name, value in frozen_before.items():  # the bases (and all else frozen) are untouched
        np.testing.assert_array_equal(np.asarray(one.frozen[name]), value, err_msg=name)
        np.testing.assert_array_equal(np.asarray(eight.frozen[name]), value, err_msg=name)
    assert all(np.abs(np.asarray(v)).max() > 0 for n, v in one.state.trainable.items() if n.endswith(".b"))
    # Optimizer state exists for the adapters only: adam's mu and nu mirror the trainable dict.
    mu = one.state.opt_state[1][0].mu
    assert sorted(mu) == sorted(one.state.trainable)
    spec = lambda tree, name: tuple(tree[name].sharding.spec)  # noqa: E731
    # Laid out on the mesh: packed codes over tensor (output dim), adapters over fsdp (input
    # dim) and tensor (output dim), the embedding over tensor (vocab) and fsdp (embed), dense
    # bases over both (all-gathered inside the step).
    assert spec(eight.frozen, "layers.0.mlp.up_proj.kernel.base.codes") == (None, "tensor")
    assert spec(eight.state.trainable, "layers.0.mlp.up_proj.kernel.a") == ("fsdp", None)
    assert spec(eight.state.trainable, "layers.0.mlp.up_proj.kernel.b") == (None, "tensor")
    assert spec(eight.frozen, "embed_tokens.embedding") == ("tensor", "fsdp")
    assert spec(eight.frozen, "layers.0.self_attn.q_proj.kernel.base") == ("fsdp", "tensor")
    assert spec(eight.frozen, "layers.0.self_attn.o_proj.kernel.base") == ("tensor", "fsdp")
    assert eight.state.trainable["layers.0.mlp.up_proj.kernel.a"].addressable_shards[0].data.shape == (32, 4)


@inner
def test_inner_compressed_leaves_shard_like_their_weight():
    import jax

    from jaxcompress.quant.config import LayerConfig
    from jaxcompress.train.config import ALL_PROJECTIONS
    from jaxcompress.train.lora import named_weights
    from jaxcompress.train.qat import add_fake_quant
    from jaxcompress.train.sharding import sharder_from_config
    from test_train_common import numpy_model, pure_tree

    sharder = sharder_from_config(_config("qat").mesh, jax.devices())
    # Shardings depend on shapes only: the fake-quantized tree is traced abstractly, not computed.
    tree = jax.eval_shape(lambda t: add_fake_quant(t, ALL_PROJECTIONS, LayerConfig(bits=4, group_size=32), "learned"),
                          pure_tree(numpy_model())[1])
    fq = named_weights(sharder.params(tree))["layers.0.mlp.down_proj.kernel"]  # [160 (mlp), 64 (embed)]
    assert tuple(fq.w.spec) == ("tensor", "fsdp")
    assert tuple(fq.scale.spec) == (None, "fsdp") and tuple(fq.zero.spec) == (None, "fsdp")


@inner
def test_inner_batch_must_divide_the_data_axes(tmp_path):
    from jaxcompress.errors import ConfigError
    from jaxcompress.train.run import run_training

    cfg = _config("lora", batch_size=6, mesh={"data": 4, "fsdp": 2, "tensor": 1})
    with pytest.raises(ConfigError, match=r"batch_size=6 does not divide over the data axes \(data=4 x fsdp=2 = 8 "
                                          r"shards\); use a multiple of 8"):
        run_training(cfg, str(tmp_path))
    with pytest.raises(ConfigError, match="mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"):
        run_training(_config("lora", mesh={"data": 3}), str(tmp_path))
