"""`jaxcompress train lora|qlora|qat|full --config C --out DIR [--set key=value ...]`."""

from __future__ import annotations

import argparse

from jaxcompress.train.config import MODES

HELP = {
    "lora": "LoRA adapters on a dense (or already compressed) model",
    "qlora": "LoRA adapters on a quantized, frozen base (RTN from `quant`, or the config's recipe)",
    "qat": "quantization-aware training: fake-quantized weights with a straight-through estimator",
    "full": "plain fine-tuning of every floating-point weight",
}


def cmd_train(args) -> None:
    from jaxcompress.train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any JAX computation
    from jaxcompress.train.config import load_config
    from jaxcompress.train.run import run_training

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    cfg = load_config(args.config, overrides, mode=args.mode)
    record = run_training(cfg, args.out)
    before, after = record.get("eval_before"), record.get("eval_after")
    if after:
        line = f"held-out loss {after['loss']:.4f} (ppl {after['ppl']:.2f})"
        if before:
            line = (f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f} "
                    f"(ppl {before['ppl']:.2f} -> {after['ppl']:.2f})")
        print(line)
    print(f"wrote {args.out}/results.json; outputs: {', '.join(record.get('outputs', []))}")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="recovery training: LoRA, QLoRA, QAT, full fine-tuning")
    modes = p.add_subparsers(dest="mode", required=True)
    for mode in MODES:
        m = modes.add_parser(mode, help=HELP[mode], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        m.add_argument("--config", help="YAML train config (configs/train/*.yaml); defaults otherwise")
        m.add_argument("--out", required=True, help="output folder (tensorboard/, checkpoints/, final/, "
                                                      "results.json); an existing run there is resumed")
        m.add_argument("--model", help="override the config's model")
        m.add_argument("--data-dir", help="data folder (default: $JAXCOMPRESS_DATA, else ../shared/data)")
        m.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has checkpoints")
        m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set lora.rank=32 --set optim.lr=1e-4")
        m.set_defaults(func=cmd_train)
