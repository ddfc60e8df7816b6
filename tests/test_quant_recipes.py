"""Recipes, per-layer rules, the `compress` command and the sweep runner, on a tiny real model
(a random Llama with a BPE tokenizer trained on WikiText-2, `tests/eval_tiny.py`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eval_tiny
from jaxcompress.cli import main
from jaxcompress.errors import ConfigError
from jaxcompress.experiments import recipes
from jaxcompress.experiments.recipes import apply_recipe, load_recipe, recipe_names, register_recipe_section
from jaxcompress.experiments.sweep import run_sweep
from jaxcompress.io.checkpoint import load_checkpoint, save_checkpoint
from jaxcompress.io.load import load_model
from jaxcompress.models.build import flat_params, path_str
from jaxcompress.quant.config import parse_weights, resolve_policy
from jaxcompress.quant.qarray import QArray

SMALL = ["weights.group_size=32", "calibration.num_samples=4", "calibration.seqlen=64", "calibration.batch_size=2"]


@pytest.fixture(scope="module")
def folder():
    return eval_tiny.tiny_model()[0]


def leaves(model):
    return {path_str(p): v for p, v in flat_params(model).items()}


def test_every_recipe_file_is_valid():
    names = recipe_names()
    for required in ("rtn_w4_g128", "rtn_w3_g128", "gptq_w4_g128", "gptq_w3_g128", "awq_w4_g128", "awq_w3_g128",
                     "squeezellm_w4", "squeezellm_w3"):
        assert required in names
    for name in names:
        recipe = load_recipe(name)
        if recipe.get("weights", {}).get("method", "rtn") != "rtn":  # the published calibration protocol
            assert {k: recipe["calibration"][k] for k in ("source", "num_samples", "seqlen", "seed")} == \
                dict(source="wikitext2", num_samples=128, seqlen=2048, seed=0)
    r = load_recipe("gptq_w3_g128", ["calibration.num_samples=32", "weights.gptq.act_order=true",
                                     "weights.group_size=channel"])
    assert r["calibration"]["num_samples"] == 32 and r["weights"]["gptq"]["act_order"] is True
    assert r["weights"]["group_size"] == "channel" and r["name"] == "gptq_w3_g128"
    # every field can be overridden, including defaults the file does not spell out
    assert load_recipe("rtn_w4_g128", ["weights.mse.grid=50"])["weights"]["mse"]["grid"] == 50


@pytest.mark.parametrize("override,message", [
    ("weights.bitz=3", r"no key 'weights.bitz'"),
    ("weights.bits=7", r"weights.bits=7 is not supported"),
    ("weights.group_size=0", r"weights.group_size=0 must be a positive integer, 'channel' \(or -1\) or 'tensor'"),
    ("weights.gptq.act_order=maybe", r"weights.gptq.act_order='maybe' must be true or false"),
    ("weights.gptq.sink_weight=0.5", r"weights.gptq.sink_weight=0.5 must be at least 1"),
    ("weights.squeezellm.kmeans_init=random", r"weights.squeezellm.kmeans_init='random': choose kmeans\+\+ or quantile"),
    ("weights.rules=[{pattern: 'lm_head.*', overrides: {method: awq}}]", r"rules\[0\]: method awq cannot be mixed"),
    ("weights.rules=[{pattern: '(', skip: true}]", r"rules\[0\].pattern='\(' is not a valid regular expression"),
    ("weights.rules=[{pattern: 'x', overrides: {bitz: 2}}]", r"rules\[0\].overrides: unknown key\(s\) bitz"),
    ("calibration.num_samples=-1", r"calibration.num_samples=-1 must be a positive integer"),
])
def test_bad_recipe_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("gptq_w4_g128", [override])


def test_unknown_section_and_squeezellm_grouping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("weights: {method: rtn}\nprunning: {sparsity: 0.5}\n")
    with pytest.raises(ConfigError, match=r"unknown section 'prunning'"):
        load_recipe(str(path))
    with pytest.raises(ConfigError, match="squeezellm builds one codebook per output channel"):
        load_recipe("squeezellm_w4", ["weights.group_size=128"])


def test_rules_choose_per_layer_configs(folder):
    model = load_model(folder).model
    shapes = {p: tuple(v.shape) for p, v in leaves(model).items()}
    weights = parse_weights({"method": "gptq", "bits": 3, "group_size": 32, "rules": [
        {"pattern": r"layers\.0\..*", "skip": True},
        {"pattern": r"layers\.\d+\.mlp\.down_proj\.kernel", "overrides": {"bits": 8, "group_size": "channel"}},
        {"pattern": r"layers\.1\.mlp\..*", "overrides": {"bits": 4}},  # down_proj matched the rule above first
        {"pattern": r"lm_head\.kernel", "overrides": {"method": "rtn", "bits": 8}},
    ]})
    policy = resolve_policy(list(shapes), weights, shapes)
    assert not any(p.startswith("layers.0.") for p in policy)
    assert policy["layers.1.mlp.down_proj.kernel"].bits == 8
    assert policy["layers.1.mlp.down_proj.kernel"].group_size == "channel"
    assert policy["layers.1.mlp.up_proj.kernel"].bits == 4
    assert policy["layers.1.self_attn.q_proj.kernel"].bits == 3
    assert policy["lm_head.kernel"].method == "rtn" and "embed_tokens.embedding" not in policy
    with pytest.raises(ConfigError, match=r"lm_head.kernel: gptq needs the inputs of a decoder-block projection"):
        resolve_policy(list(shapes), parse_weights({"method": "gptq", "group_size": 32, "targets": r".*kernel"}), shapes)
    with pytest.raises(ConfigError, match=r"layers.0.input_layernorm.scale: has shape \(64,\)"):
        resolve_policy(list(shapes), parse_weights({"method": "rtn", "targets": r".*layernorm.*"}), shapes)


def test_compress_writes_a_bit_exact_loadable_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "ckpt"
    sets = SMALL + ["weights.gptq.act_order=true", "weights.gptq.true_sequential=false"]
    argv = ["compress", "--model", folder, "--recipe", "gptq_w4_g128", "--out", str(out), "--dtype", "float32"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compression_ratio"] > 1.5 and summary["recipe"] == "gptq_w4_g128"
    restored = load_model(str(out))
    got = leaves(restored.model)
    q = got["layers.1.mlp.down_proj.kernel"]
    assert isinstance(q, QArray) and q.perm is not None and q.shape == (112, 64) and q.num_groups == 4  # ragged
    assert sum(isinstance(v, QArray) for v in got.values()) == 14
    _, _, meta = load_checkpoint(str(out))
    calib = meta["recipe"]["applied"]["weights"]["calibration"]
    assert calib["num_samples"] == 4 and len(calib["offsets"]) == 4 and calib["source"] == "wikitext2"
    assert meta["recipe"]["overrides"] == sets
    # Bit-exact: the same compression in this process (calibration is seeded) gives the same leaves.
    expect = apply_recipe(load_model(folder, dtype=jnp.float32, param_dtype=jnp.float32),
                          load_recipe("gptq_w4_g128", sets))
    for path, leaf in leaves(expect.model).items():
        for a, b in zip(jax.tree_util.tree_leaves(leaf), jax.tree_util.tree_leaves(got[path]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    tokens = jnp.asarray([list(range(5, 69))])
    logits = nnx.jit(lambda m, t: m(t)[0])
    np.testing.assert_array_equal(np.asarray(logits(restored.model, tokens)), np.asarray(logits(expect.model, tokens)))


def test_codebook_and_outliers_round_trip(folder, tmp_path):
    from jaxcompress.quant.config import LayerConfig, SqueezeLLMOptions
    from jaxcompress.quant.squeezellm import squeezellm_quantize
    from jaxcompress.quant.tree import replace_leaves

    model = load_model(folder).model
    w = leaves(model)["layers.0.mlp.up_proj.kernel"]
    cfg = LayerConfig(method="squeezellm", bits=3, group_size="channel",
                      squeezellm=SqueezeLLMOptions(outlier_fraction=0.01))
    q = squeezellm_quantize(w, jnp.abs(w) + 1.0, cfg, "up")
    save_checkpoint(replace_leaves(model, {"layers.0.mlp.up_proj.kernel": q}), str(tmp_path / "c"))
    back = leaves(load_checkpoint(str(tmp_path / "c"))[0])["layers.0.mlp.up_proj.kernel"]
    for field in ("codes", "codebook", "outlier_index", "outlier_value"):
        np.testing.assert_array_equal(np.asarray(getattr(back, field)), np.asarray(getattr(q, field)))
    assert back.bits == 3 and back.scale is None


def test_bad_group_size_leaves_no_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["compress", "--model", folder, "--recipe", "gptq_w4_g128", "--out", str(out), "--dtype", "float32"])
    assert code == 2 and not out.exists() and not any(tmp_path.iterdir())
    assert "layers.0.mlp.down_proj.kernel: group_size=128 is larger than the input dimension 112" in \
        capsys.readouterr().err


def test_sweep_writes_one_file_per_cell_and_skips_finished(folder, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
name: tiny
model: {folder}
dtype: float32
eval: {{tasks: [wikitext2], seqlen: 64, limit: 2, batch_size: 2}}
cells:
  - recipe: rtn_w4_g128
    overrides: [weights.group_size=32]
    grid: {{weights.bits: [3]}}
""")
    out = tmp_path / "runs"
    records = run_sweep(str(sweep), str(out), log=None)
    assert [r["cell"] for r in records] == ["baseline", "rtn_w4_g128-bits=3"]
    for r in records:
        saved = json.loads((out / f"{r['cell']}.json").read_text())
        assert saved["results"]["wikitext2"]["windows"] == 2 and saved["results"]["wikitext2"]["ppl"] > 1
    assert records[1]["results"]["wikitext2"]["ppl"] != records[0]["results"]["wikitext2"]["ppl"]
    assert records[1]["recipe"] == "rtn_w4_g128" and records[1]["compression_ratio"] > 1
    assert records[1]["recipe_config"]["weights"]["bits"] == 3
    stamp = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".json")}
    again = run_sweep(str(sweep), str(out), log=None)
    assert [r["cell"] for r in again] == [r["cell"] for r in records]
    assert stamp == {f: os.path.getmtime(out / f) for f in stamp}  # nothing recomputed
    changed = run_sweep(str(sweep), str(out), overrides=["eval.limit=1"], only="bits=3", log=None)
    assert changed[0]["results"]["wikitext2"]["windows"] == 1
    assert (out / "summary.md").read_text().startswith("| cell | wikitext2 ppl |")


def test_plugin_sections_are_applied_and_recorded(folder):
    seen = []

    def normalize(section):
        if set(section) - {"tag"}:
            raise ConfigError(f"marker: unknown key(s) {set(section) - {'tag'}}")
        return {"tag": "none", **section}

    def apply(loaded, section):  # the two-argument form
        seen.append(section["tag"])
        return loaded

    register_recipe_section("marker", apply, normalize)
    try:
        loaded = load_model(folder)
        recipe = load_recipe({"name": "inline", "weights": {"method": "rtn", "group_size": 32}, "marker": {}},
                             ["marker.tag=x"])
        out = apply_recipe(loaded, recipe)
        assert seen == ["x"] and out.recipe["marker"] == {"tag": "x"}
        assert out.recipe["applied"]["weights"]["quantized"] == 14  # 2 blocks x 7 projections (default targets)
    finally:
        recipes._SECTIONS.pop("marker")
