"""Training throughput: tokens/s per device for LoRA and QLoRA steps, and data-parallel scaling.

    # GPU (one H100): SmolLM2-135M LoRA and random:llama2-7b QLoRA (W4 g64 base, LoRA r16)
    PYTHONPATH=. python scripts/train_throughput.py --out docs/results/train_throughput.json
    # two GPUs: adds SmolLM2 LoRA data-parallel on 1 vs 2 devices (same per-device batch)
    PYTHONPATH=. python scripts/train_throughput.py --cases smollm2-lora,dp-scaling --out ...
    # CPU smoke run (seconds): tiny shapes
    PYTHONPATH=. python scripts/train_throughput.py --tiny --out /tmp/tp.json

Each case builds the real trainer (the same jitted, sharded step as `jaxcompress train`), runs
`--warmup` steps (compilation), then times `--steps` steps with the device synchronised, on
synthetic token ids (throughput does not depend on the text). tokens/s counts input tokens
(batch x seq_len x accumulation) per optimizer step. Writes a JSON record and a Markdown table.
Peak device memory is the process's peak (model setup included: for QLoRA the dense weights
exist until they are quantized), so run one case per process to read it per case
(scripts/gpu/train.sh does); the memory in use after the timed steps is recorded too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# name: (model spec, mode, per-device batch, seq_len, lora rank, quant bits, group size).
# The reference attention keeps fp32 probabilities [B, H, L, L] per layer for the backward pass
# (no flash attention yet): 7B at B=1, L=2048 keeps ~17 GB of them, B=4 would not fit an H100.
CASES = {
    "smollm2-lora": ("smollm2-135m", "lora", 16, 1024, 16, None, None),
    "llama2-7b-qlora": ("random:llama2-7b", "qlora", 1, 2048, 16, 4, 64),
}
TINY = {
    "smollm2-lora": ("random:tiny", "lora", 4, 64, 8, None, None),
    "llama2-7b-qlora": ("random:tiny", "qlora", 4, 64, 8, 4, 32),
}


def make_config(model, mode, batch, seq_len, rank, bits, group, dtype, data_axis):
    from jaxcompress.train.config import TrainConfig, parse

    raw = {"mode": mode, "model": model, "steps": 1000, "batch_size": batch * data_axis,
           "compute_dtype": dtype, "param_dtype": dtype, "lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.0},
           "data": {"seq_len": seq_len}, "optim": {"lr": 1e-4}, "mesh": {"data": data_axis, "fsdp": 1, "tensor": 1}}
    if bits:
        raw["quant"] = {"bits": bits, "group_size": group}
    return parse(TrainConfig, raw)


def synthetic_batch(batch, seq_len, vocab, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq_len), np.float32),
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def memory(device) -> dict:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def measure(cfg, devices, warmup: int, steps: int) -> dict:
    """Builds the model and the trainer, drops every other reference to the weights (so only the
    trainer's copy is live while timing), runs `warmup` steps, then times `steps` steps."""
    import jax

    from jaxcompress.train.run import load_for_training
    from jaxcompress.train.sharding import sharder_from_config
    from jaxcompress.train.trainer import Trainer

    t0 = time.perf_counter()
    loaded = load_for_training(cfg)
    vocab = loaded.config.vocab_size
    sharder = sharder_from_config(cfg.mesh, devices)
    trainer = Trainer(cfg, loaded.model, cfg.steps, sharder)
    del loaded
    jax.block_until_ready(trainer.frozen)
    setup_s = time.perf_counter() - t0
    log(f"  model + trainer ready in {setup_s:.1f} s ({trainer.trainable_count():,} trainable, "
        f"{trainer.frozen_count():,} frozen parameters)")
    batches = [synthetic_batch(cfg.batch_size, cfg.data.seq_len, vocab, s) for s in range(4)]
    t0 = time.perf_counter()
    for i in range(warmup):
        jax.block_until_ready(trainer.step([batches[i % 4]]))
    compile_s = time.perf_counter() - t0
    log(f"  {warmup} warm-up steps (compilation included) in {compile_s:.1f} s")
    t0 = time.perf_counter()
    for i in range(steps):  # dispatched back to back, as the training loop does
        metrics = trainer.step([batches[i % 4]])
    jax.block_until_ready((metrics, trainer.state))
    seconds = (time.perf_counter() - t0) / steps
    tokens = cfg.batch_size * cfg.data.seq_len
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise SystemExit(f"loss is {loss} after {warmup + steps} steps: the timed step is broken")
    mem = memory(devices[0])
    return {"devices": len(devices), "global_batch": cfg.batch_size, "seq_len": cfg.data.seq_len,
            "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_device": tokens / seconds / len(devices),
            "timed_steps": steps, "warmup_steps": warmup, "warmup_seconds": compile_s, "setup_seconds": setup_s,
            "trainable_parameters": trainer.trainable_count(), "frozen_parameters": trainer.frozen_count(),
            "loss": loss, "peak_bytes_device0": mem.get("peak_bytes_in_use"),
            "bytes_in_use_device0": mem.get("bytes_in_use"), "bytes_limit_device0": mem.get("bytes_limit")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="smollm2-lora,llama2-7b-qlora,dp-scaling",
                   help="comma list of smollm2-lora, llama2-7b-qlora, dp-scaling (needs 2 devices)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--dtype", default="auto", help="compute/storage dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, help="override the per-device batch")
    p.add_argument("--seq-len", type=int, help="override the sequence length")
    p.add_argument("--model", help="override the case's model spec, e.g. random:smollm2-135m (the same shapes "
                                   "with random weights: the step's work and time do not depend on the values)")
    p.add_argument("--out", required=True, help="JSON output (a .md table is written beside it)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxcompress.io.atomic import write_json, write_text
    from jaxcompress.provenance import provenance
    from jaxcompress.train.trainer import resolve_dtype

    table = TINY if args.tiny else CASES
    results = {}
    wanted = [c for c in args.cases.split(",") if c]
    for name in wanted:
        base = "smollm2-lora" if name == "dp-scaling" else name
        if base not in table:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(list(CASES) + ['dp-scaling'])}")
        model, mode, batch, seq_len, rank, bits, group = table[base]
        model = args.model or model
        batch, seq_len = args.batch or batch, args.seq_len or seq_len
        data_axes = [1, 2] if name == "dp-scaling" else [1]
        if max(data_axes) > jax.device_count():
            log(f"skipping {name}: needs {max(data_axes)} devices, {jax.device_count()} visible")
            continue
        runs = []
        for data_axis in data_axes:
            cfg = make_config(model, mode, batch, seq_len, rank, bits, group, args.dtype, data_axis)
            log(f"{name}: {model} {mode}, {data_axis} device(s), batch {cfg.batch_size} x {seq_len}")
            run = measure(cfg, jax.devices()[:data_axis], args.warmup, args.steps)
            log(f"{name} devices={data_axis}: {run['tokens_per_s']:,.0f} tokens/s "
                f"({run['tokens_per_s_per_device']:,.0f} per device), {run['seconds_per_step'] * 1e3:.1f} ms/step, "
                f"peak {_gib(run['peak_bytes_device0'])} GiB")
            runs.append(run)
        entry = {"model": model, "mode": mode, "per_device_batch": batch, "seq_len": seq_len, "lora_rank": rank,
                 "quant": {"bits": bits, "group_size": group} if bits else None,
                 "dtype": jnp.dtype(resolve_dtype(args.dtype)).name, "runs": runs}
        if name == "dp-scaling":
            entry["scaling_2_vs_1"] = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
            log(f"data-parallel scaling 1 -> 2 devices: {entry['scaling_2_vs_1']:.2f}x")
        results[name] = entry
    record = {"cases": results, "tiny": args.tiny, "synthetic_tokens": True, **provenance()}
    write_json(args.out, record)
    rows = ["| case | model | mode | devices | batch x seq | ms/step | tokens/s | tokens/s/device | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for run in entry["runs"]:
            rows.append(f"| {name} | {entry['model']} | {entry['mode']} | {run['devices']} | "
                        f"{run['global_batch']} x {run['seq_len']} | {run['seconds_per_step'] * 1e3:.1f} | "
                        f"{run['tokens_per_s']:,.0f} | {run['tokens_per_s_per_device']:,.0f} | "
                        f"{_gib(run['peak_bytes_device0'])} |")
        if "scaling_2_vs_1" in entry:
            rows.append(f"| {name} | | | 2 vs 1 | | | {entry['scaling_2_vs_1']:.2f}x | | |")
    rows.append(f"\n{record['device']}, jax {record['versions'].get('jax')}, commit {record['git_commit']}")
    write_text(os.path.splitext(args.out)[0] + ".md", "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


if __name__ == "__main__":
    sys.exit(main())
