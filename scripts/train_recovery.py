"""Recovery: how much of a quantized model's WikiText-2 perplexity gap does LoRA win back?

    # GPU: SmolLM2-135M, W3 g128 (RTN) base, LoRA r16 on Alpaca + C4 (configs/train/qlora_w3_r16.yaml)
    PYTHONPATH=. python scripts/train_recovery.py --config configs/train/qlora_w3_r16.yaml --out runs/rec16
    # GPTQ base: add --set recipe=gptq_w3_g128 ; other ranks: qlora_w3_r8.yaml / qlora_w3_r32.yaml
    # CPU smoke run (a minute): random:tiny, byte tokenizer, a few steps, short windows
    PYTHONPATH=. python scripts/train_recovery.py --tiny --out /tmp/rec

Measures WikiText-2 test perplexity (the GPTQ protocol, `--seqlen`, default 2048) of
  1. the dense model,  2. the model after the config's weight recipe (the frozen QLoRA base),
  3. the trained model as it runs (quantized base + LoRA adapters: OUT/run/final/model),
  4. the adapters merged and re-quantized onto the base grid (deployable: OUT/run/final/merged),
and reports the fraction of the gap recovered, (ppl_q - ppl_lora) / (ppl_q - ppl_dense). Writes
OUT/recovery.json, OUT/recovery.md and OUT/recovery_curve.png (train and held-out loss).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_OVERRIDES = ["model=random:tiny", "data.tokenizer=bytes", "steps=6", "epochs=null", "batch_size=4",
                  "data.seq_len=64", "data.eval_examples=8",
                  "data.sources=[{kind: instruct, name: alpaca, max_examples: 64}, "
                  "{kind: text, name: c4, max_examples: 16}]",
                  "log.every=1", "log.eval_every=3", "log.sample_every=0", "checkpoint.every=0",
                  "log.progress=false", "recipe_overrides=[weights.group_size=32]", "optim.lr=1e-2",
                  "compute_dtype=float32", "param_dtype=float32"]


def wikitext_ppl(loaded, seqlen: int, limit: int | None, batch_size: int, data_dir) -> dict:
    from jaxcompress.eval.perplexity import perplexity, wikitext2_tokens

    tokens = wikitext2_tokens(loaded.tokenizer, "test", data_dir)
    return perplexity(loaded, tokens, seqlen=seqlen, limit=limit, batch_size=batch_size, progress=False)


def plot_curve(log_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcompress.train.logs import read_json_log

    log = read_json_log(log_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag, style in (("train/loss", "-"), ("eval/loss", "o-")):
        points = [(e["step"], e[tag]) for e in log if tag in e]
        if points:
            ax.plot(*zip(*points), style, label=tag)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/train/qlora_w3_r16.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny", action="store_true", help="tiny CPU smoke run (random:tiny, byte tokenizer)")
    p.add_argument("--seqlen", type=int, help="perplexity window (default 2048; 64 with --tiny)")
    p.add_argument("--limit", type=int, help="first N perplexity windows only (default all; 4 with --tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="perplexity windows per batch")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from jaxcompress.errors import ConfigError
    from jaxcompress.experiments.recipes import apply_recipe, load_recipe
    from jaxcompress.io.atomic import write_json, write_text
    from jaxcompress.io.load import LoadedModel, load_model
    from jaxcompress.provenance import provenance
    from jaxcompress.train.config import load_config, to_dict
    from jaxcompress.train.data import resolve_tokenizer
    from jaxcompress.train.run import run_training
    from jaxcompress.train.trainer import resolve_dtype

    overrides = (TINY_OVERRIDES if args.tiny else []) + args.overrides
    seqlen = args.seqlen or (64 if args.tiny else 2048)
    limit = args.limit if args.limit is not None else (4 if args.tiny else None)
    cfg = load_config(args.config, overrides)
    if not cfg.recipe:
        raise ConfigError(f"{args.config}: recovery needs a weight recipe (set `recipe`)")
    if cfg.mode not in ("lora", "qlora"):
        raise ConfigError(f"{args.config}: recovery measures LoRA adapters; mode is {cfg.mode!r}")
    os.makedirs(args.out, exist_ok=True)

    compute, storage = resolve_dtype(cfg.compute_dtype), resolve_dtype(cfg.param_dtype)
    dense = load_model(cfg.model, dtype=compute, param_dtype=storage)
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, dense.tokenizer, dense.config.vocab_size)
    dense = LoadedModel(dense.model, tokenizer, dense.spec, dense.fingerprint)
    ppl = {"dense": wikitext_ppl(dense, seqlen, limit, args.batch_size, cfg.data.data_dir)}
    print(f"dense      ppl {ppl['dense']['ppl']:.3f}")
    quantized = apply_recipe(dense, load_recipe(cfg.recipe, list(cfg.recipe_overrides)), data_dir=cfg.data.data_dir)
    ppl["quantized"] = wikitext_ppl(quantized, seqlen, limit, args.batch_size, cfg.data.data_dir)
    print(f"quantized  ppl {ppl['quantized']['ppl']:.3f} ({cfg.recipe})")
    del dense

    run_dir = os.path.join(args.out, "run")
    save = sorted(set(cfg.save or []) | {"model", "merged"})
    cfg = cfg.__class__(**{**cfg.__dict__, "save": save})
    record = run_training(cfg, run_dir, loaded=quantized)
    del quantized
    for name, folder in (("lora", "model"), ("lora_requantized", "merged")):
        trained = load_model(os.path.join(run_dir, "final", folder), dtype=compute)
        trained = LoadedModel(trained.model, tokenizer, trained.spec, trained.fingerprint)
        ppl[name] = wikitext_ppl(trained, seqlen, limit, args.batch_size, cfg.data.data_dir)
        print(f"{name:<17} ppl {ppl[name]['ppl']:.3f}")

    gap = ppl["quantized"]["ppl"] - ppl["dense"]["ppl"]
    recovered = {k: (ppl["quantized"]["ppl"] - ppl[k]["ppl"]) / gap if gap > 0 else None
                 for k in ("lora", "lora_requantized")}
    result = {"config": to_dict(cfg), "recipe": cfg.recipe, "seqlen": seqlen, "windows": ppl["dense"]["windows"],
              "wikitext2_ppl": {k: v["ppl"] for k, v in ppl.items()}, "gap_recovered": recovered,
              "held_out": {"before": record.get("eval_before"), "after": record.get("eval_after")},
              "train_steps": record["steps"], "tokens_per_s": record.get("tokens_per_s"),
              "trainable_parameters": record["trainable_parameters"], "dtype": jnp.dtype(compute).name,
              "tiny": args.tiny, **provenance()}
    write_json(os.path.join(args.out, "recovery.json"), result)
    plot_curve(os.path.join(run_dir, "log.jsonl"), os.path.join(args.out, "recovery_curve.png"))
    rows = [f"WikiText-2 test perplexity, seqlen {seqlen}, {ppl['dense']['windows']} windows; "
            f"{cfg.model}, base {cfg.recipe}, LoRA r{cfg.lora.rank}, {record['steps']} steps "
            f"({result['device']}, commit {result['git_commit']})", "",
            "| model | ppl | gap recovered |", "|---|---|---|"]
    for k, label in (("dense", "dense"), ("quantized", f"{cfg.recipe}"), ("lora", f"{cfg.recipe} + LoRA"),
                     ("lora_requantized", "LoRA merged, re-quantized")):
        frac = recovered.get(k)
        rows.append(f"| {label} | {ppl[k]['ppl']:.3f} | {'' if frac is None else f'{100 * frac:.1f}%'} |")
    write_text(os.path.join(args.out, "recovery.md"), "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
