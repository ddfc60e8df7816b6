"""The training loop on one device: the loss falls, logs read back with TensorBoard's own reader,
outputs load, a resumed run is exact (even past a save that was killed), and the CLI runs the
smoke config."""

import json
import os

import jax
import numpy as np
import pytest

from jaxcompress.io.load import LoadedModel, load_model
from jaxcompress.train.config import TrainConfig, parse
from jaxcompress.train.logs import read_json_log, read_tensorboard
from jaxcompress.train.run import run_training
from test_train_common import TINY1, logits, numpy_model, pure_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**over) -> TrainConfig:
    base = {
        "mode": "lora", "model": "numpy:tiny1", "seed": 0, "steps": 12, "batch_size": 4,
        "compute_dtype": "float32", "param_dtype": "float32",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        # A random model's frozen head caps how far logits can move: train it (and the final norm).
        "trainable": [r"lm_head\.kernel", r"norm\.scale"],
        "data": {"tokenizer": "bytes", "seq_len": 128, "eval_examples": 8,
                 "sources": [{"kind": "instruct", "name": "alpaca", "max_examples": 32},
                             {"kind": "text", "name": "wikitext2", "max_examples": 24}]},
        "optim": {"lr": 3e-2, "warmup_steps": 2, "schedule": "cosine", "accum_steps": 2},
        "checkpoint": {"every": 6, "keep": 1},
        "log": {"every": 1, "eval_every": 6, "sample_every": 0, "progress": False},
    }
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return parse(TrainConfig, base)


def tiny_loaded():
    return LoadedModel(numpy_model(TINY1, seed=0), None, "numpy:tiny1", "numpy-tiny1-seed0")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    cfg = config(**{"log.sample_every": 12, "log.max_new_tokens": 4, "save": ["merged", "model", "adapters"]})
    return out, run_training(cfg, out, loaded=tiny_loaded())


def test_loss_falls_and_results_record(finished):
    out, record = finished
    before, after = record["eval_before"], record["eval_after"]
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert before["loss"] == pytest.approx(np.log(512), abs=0.05)  # a random model starts near uniform
    losses = [e["train/loss"] for e in read_json_log(os.path.join(out, "log.jsonl")) if "train/loss" in e]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    saved = json.load(open(os.path.join(out, "results.json")))
    # Rank-4 adapters of q, o (64 -> 64), k, v (64 -> 32), gate, up (64 -> 160), down (160 -> 64),
    # plus the extra trainables lm_head [64, 512] and the final norm [64].
    assert saved["trainable_parameters"] == 4 * (64 + 64) * 2 + 4 * (64 + 32) * 2 + 4 * (64 + 160) * 3 \
        + 64 * 512 + 64
    assert saved["steps"] == 12 and saved["best_step"] in (6, 12) and saved["git_commit"] is not None


def test_tensorboard_reads_back_what_the_json_log_says(finished):
    out, _ = finished
    tb = read_tensorboard(os.path.join(out, "tensorboard"))
    log = read_json_log(os.path.join(out, "log.jsonl"))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s", "eval/ppl"):
        want = [(e["step"], e[tag]) for e in log if tag in e]
        got = tb[tag]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    assert [s for s, _ in tb["eval/loss"]] == [0, 6, 12]
    assert tb["train/lr"][0][1] == pytest.approx(0.0) and tb["train/lr"][2][1] == pytest.approx(3e-2)
    (step, text), = tb["samples/0"]
    assert step == 12 and text.startswith("**Give three tips for staying healthy.**")


def test_outputs_load_and_agree(finished):
    out, _ = finished
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["adapters", "merged", "model"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["12", "6"] or \
        sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["12"]
    merged = load_model(os.path.join(out, "final", "merged"))
    model = load_model(os.path.join(out, "final", "model"))
    assert merged.tokenizer is not None and len(merged.tokenizer) == 259
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    g1, t1 = pure_tree(merged.model)
    g2, t2 = pure_tree(model.model)
    base = pure_tree(tiny_loaded().model)
    got_merged, got_model = logits(g1, t1, tokens), logits(g2, t2, tokens)
    np.testing.assert_allclose(got_merged, got_model, rtol=1e-5, atol=1e-5)
    assert np.abs(got_merged - logits(*base, tokens)).max() > 0.1  # training changed the function


def test_resume_is_exact_even_after_a_killed_save(finished, tmp_path):
    straight, _ = finished  # the same training; logging, evaluation and saving may differ
    cfg = config(**{"checkpoint.every": 2, "checkpoint.keep": 2, "log.eval_every": 3, "save": ["merged"]})
    resumed = str(tmp_path / "resumed")
    assert run_training(cfg, resumed, loaded=tiny_loaded(), stop_after=3) == {"stopped_at": 3}
    # A save of step 3 killed halfway leaves only orbax's temporary folder behind.
    broken = tmp_path / "resumed" / "checkpoints" / "3.orbax-checkpoint-tmp"
    os.makedirs(broken / "state")
    (broken / "state" / "half_written").write_bytes(b"\0" * 100)
    record = run_training(cfg, resumed, loaded=tiny_loaded())
    assert record["resumed_from"] == 2 and not broken.exists()

    def curve(out, tag, steps=None):
        return [(e["step"], e[tag]) for e in read_json_log(os.path.join(out, "log.jsonl"))
                if tag in e and (steps is None or e["step"] in steps)]

    for tag in ("train/loss", "train/grad_norm"):
        assert curve(resumed, tag) == curve(straight, tag), tag  # bit for bit, step 3 once
        tb = read_tensorboard(os.path.join(resumed, "tensorboard"))[tag]
        assert [s for s, _ in tb] == list(range(1, 13))  # the purge dropped the re-run step 3
    assert curve(resumed, "eval/loss", {0, 6, 12}) == curve(straight, "eval/loss")
    assert record["eval_before"] == finished[1]["eval_before"]  # carried through the checkpoint
    a = load_model(os.path.join(straight, "final", "merged"))
    b = load_model(os.path.join(resumed, "final", "merged"))
    for x, y in zip(jax.tree_util.tree_leaves(pure_tree(a.model)[1]), jax.tree_util.tree_leaves(pure_tree(b.model)[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_time_budget_ends_the_run_as_its_last_step(finished, tmp_path):
    out = str(tmp_path / "budget")  # the finished run's config: its programs are compiled already
    cfg = config(**{"save": ["model"]})
    record = run_training(cfg, out, loaded=tiny_loaded(), time_budget_s=0.0)
    assert record["steps"] == 12 and record["steps_done"] == 1 and record["stopped_by_time_budget"]
    straight = read_json_log(os.path.join(finished[0], "log.jsonl"))
    log = read_json_log(os.path.join(out, "log.jsonl"))
    first = next(e for e in straight if "train/loss" in e)
    assert first["step"] == 1 and [e["train/loss"] for e in log if "train/loss" in e] == [first["train/loss"]]
    assert [e["step"] for e in log if "eval/loss" in e] == [0, 1]  # evaluated as a last step
    assert record["eval_after"]["loss"] == pytest.approx(log[-1]["eval/loss"])
    assert os.path.isdir(os.path.join(out, "final", "model")) and os.path.isfile(os.path.join(out, "results.json"))
    assert json.load(open(os.path.join(out, "results.json")))["steps_done"] == 1


def test_resume_refuses_a_changed_config(finished):
    from jaxcompress.errors import CheckpointError

    out, _ = finished
    changed = config(**{"lora.rank": 8, "save": ["merged", "model", "adapters"]})
    with pytest.raises(CheckpointError, match="different config \\(changed: lora\\); use a new --out folder"):
        run_training(changed, out, loaded=tiny_loaded())


def test_cli_runs_the_smoke_config(tmp_path, capsys):
    from jaxcompress.cli import main

    out = str(tmp_path / "smoke")
    rc = main(["train", "lora", "--config", os.path.join(ROOT, "configs", "train", "lora_smoke.yaml"),
               "--out", out, "--set", "steps=3", "--set", "log.sample_every=0", "--set", "checkpoint.every=0",
               "--set", "data.eval_examples=0", "--set", "log.progress=false", "--set", "save=[merged]"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["checkpoints", "final", "log.jsonl", "results.json", "tensorboard"]
    assert f"outputs: {out}/final/merged" in capsys.readouterr().out
    record = json.load(open(os.path.join(out, "results.json")))
    assert record["model"] == "random:tiny" and record["steps"] == 3 and record["data"]["eval"] is None
    rc = main(["train", "qat", "--config", os.path.join(ROOT, "configs", "train", "lora_smoke.yaml"), "--out", out])
    assert rc == 2 and "the config is for mode 'lora', not 'qat'" in capsys.readouterr().err


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path):
    from jaxcompress.train.checkpoint import TrainCheckpoints, abstract_like

    ckpts = TrainCheckpoints(str(tmp_path / "ckpt"), keep=2, keep_best=True)
    for step, loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        ckpts.save(step, {"w": np.full((3,), step, np.float32)}, {"step": step}, eval_loss=loss)
    ckpts.wait()
    assert ckpts.all_steps() == [2, 4, 5] and ckpts.best_step() == 2 and ckpts.latest_step() == 5
    assert ckpts.meta(2) == {"step": 2}
    restored = ckpts.restore(2, abstract_like({"w": np.zeros((3,), np.float32)}))
    np.testing.assert_array_equal(np.asarray(restored["w"]), [2, 2, 2])
    ckpts.close()


def test_mixed_precision_keeps_fp32_masters_and_optimizer_state():
    import jax.numpy as jnp

    from jaxcompress.train.sharding import sharder_from_config
    from jaxcompress.train.trainer import Trainer

    cfg = config(**{"compute_dtype": "bfloat16", "param_dtype": "bfloat16"})
    model = numpy_model(TINY1, seed=0, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    trainer = Trainer(cfg, model, 4, sharder_from_config(cfg.mesh))
    assert {v.dtype for v in trainer.state.trainable.values()} == {jnp.dtype("float32")}
    assert {v.dtype for v in jax.tree_util.tree_leaves(trainer.state.opt_state) if v.ndim} == {jnp.dtype("float32")}
    assert trainer.frozen["layers.0.mlp.up_proj.kernel.base"].dtype == jnp.bfloat16
    assert trainer.model().dtype == jnp.bfloat16  # activations in bf16
    # Exported weights go back to their storage dtype; adapters stay fp32.
    exported = trainer.export_tree()
    assert exported["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert exported["layers"][0]["mlp"]["up_proj"]["kernel"].a.dtype == jnp.float32
