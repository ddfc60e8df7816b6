"""One training run end to end: `jaxcompress train lora|qlora|qat --config C --out DIR`.

    DIR/tensorboard/    event files: train/loss, train/lr, train/grad_norm, throughput/*,
                        eval/loss, eval/ppl, samples/*
    DIR/log.jsonl       the same scalars, one JSON object per logged step
    DIR/checkpoints/    orbax steps (the last k and the best by eval loss); resumed from
    DIR/final/          merged | model | adapters (see `save` in the config)
    DIR/results.json    config, before/after held-out loss, throughput, provenance
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.io.atomic import write_json
from jaxcompress.train import data as data_lib
from jaxcompress.train.checkpoint import TrainCheckpoints, abstract_like, check_resumable, config_fingerprint
from jaxcompress.train.config import TrainConfig, to_dict
from jaxcompress.train.logs import LOG_FILE, JsonLog, TensorBoardWriter
from jaxcompress.train.sharding import sharder_from_config
from jaxcompress.train.trainer import Trainer, resolve_dtype

DEFAULT_SAVE = {"lora": ("merged",), "qlora": ("model",), "qat": ("merged",), "full": ("merged",)}


def load_for_training(cfg: TrainConfig):
    """The model (compute and storage dtypes from the config), with its weight recipe applied."""
    from jaxcompress.io.load import load_model

    compute = resolve_dtype(cfg.compute_dtype)
    storage = resolve_dtype(cfg.param_dtype)
    loaded = load_model(cfg.model, dtype=compute, param_dtype=storage)
    if cfg.recipe:
        try:
            from jaxcompress.experiments.recipes import apply_recipe, load_recipe
        except ModuleNotFoundError as e:
            raise ConfigError(f"recipe={cfg.recipe!r}: weight recipes are not available in this "
                              f"installation ({e})") from None
        recipe = load_recipe(cfg.recipe, list(cfg.recipe_overrides))
        loaded = apply_recipe(loaded, recipe, data_dir=cfg.data.data_dir)
    return loaded


def prepare_data(cfg: TrainConfig, tokenizer) -> dict[str, Any]:
    examples = data_lib.load_examples(cfg.data, tokenizer)
    train, held = data_lib.split_examples(examples, cfg.data.eval_examples, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = data_lib.pack(train, cfg.data.seq_len, cfg.data.packing, pad)
    eval_rows = data_lib.pack(held, cfg.data.seq_len, cfg.data.packing, pad) if held else None
    return {"train": train_rows, "eval": eval_rows, "examples": len(examples)}


def total_steps(cfg: TrainConfig, rows: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.optim.accum_steps
    return max(1, math.ceil(cfg.epochs * rows / per_step))


def _mean(values: list[dict]) -> dict[str, float]:
    host = jax.device_get(values)
    return {k: float(np.mean([v[k] for v in host])) for k in host[0]}


def _export_tree(trainer: Trainer, kind: str, mode: str):
    from jaxcompress.train.lora import merge_lora
    from jaxcompress.train.qat import finalize_qat, requantize_like

    tree = trainer.export_tree()
    if kind == "model":
        return tree
    if mode == "lora":
        return merge_lora(tree)
    if mode == "qlora":
        return merge_lora(tree, requantize=requantize_like)
    if mode == "qat":
        return finalize_qat(tree)
    return tree


def save_outputs(trainer: Trainer, cfg: TrainConfig, tokenizer, final_dir: str) -> list[str]:
    """Writes what `save` asks for under final_dir; only process 0 writes."""
    from flax import nnx

    from jaxcompress.io.checkpoint import save_checkpoint
    from jaxcompress.train.lora import save_adapters

    kinds = DEFAULT_SAVE[cfg.mode] if cfg.save is None else tuple(cfg.save)
    written = []
    for kind in kinds:
        folder = os.path.join(final_dir, kind)
        if kind == "adapters":
            tree = _host(trainer.export_tree())
            if jax.process_index() == 0:
                save_adapters(tree, folder, base_model=cfg.model)
        else:
            tree = _host(_export_tree(trainer, kind, cfg.mode))
            if jax.process_index() == 0:
                save_checkpoint(nnx.merge(trainer.graphdef, tree), folder, tokenizer=tokenizer,
                                extra={"source": cfg.model, "recipe": cfg.recipe,
                                       "training": {"mode": cfg.mode, "output": kind}})
        written.append(folder)
    return written


def _host(tree):
    """Fully addressable arrays (gathered across hosts in a multi-process run)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _samples(trainer: Trainer, tokenizer, cfg: TrainConfig) -> list[tuple[str, str]]:
    from jaxcompress.io.load import LoadedModel
    from jaxcompress.models.generate import generate

    loaded = LoadedModel(trainer.model(), tokenizer, cfg.model, "training")
    chat = bool(getattr(tokenizer, "chat_template", None))
    outs = generate(loaded, list(cfg.log.sample_prompts), max_new_tokens=cfg.log.max_new_tokens, chat=chat)
    return list(zip(cfg.log.sample_prompts, outs))


def run_training(cfg: TrainConfig, out_dir: str, devices=None, loaded=None, stop_after: int | None = None,
                 time_budget_s: float | None = None) -> dict:
    """Trains as `cfg` says, writing everything under out_dir; returns the results record.

    `stop_after` ends the run after that many optimizer steps of this invocation, as an
    interruption would (no final outputs); used to test exact resumption.
    `time_budget_s` caps the wall-clock seconds of this invocation's training loop, counted from
    the end of its first step (so compilation is not counted): the step that crosses it becomes
    the last one (final evaluation, checkpoint and outputs as usual). The schedule keeps its
    planned length, so a cut run ends before its learning rate has decayed; the record says
    `stopped_by_time_budget`. Single-process runs only (hosts' clocks would disagree on the step).
    """
    from tqdm.auto import tqdm

    from jaxcompress.provenance import provenance
    from jaxcompress.train.data import resolve_tokenizer

    start_time = time.time()
    if time_budget_s is not None and jax.process_count() > 1:
        raise ConfigError("time_budget_s works in single-process runs only; set `steps` instead")
    cfg_dict = to_dict(cfg)
    fingerprint, pinned = config_fingerprint(cfg_dict)
    os.makedirs(out_dir, exist_ok=True)
    sharder = sharder_from_config(cfg.mesh, devices)
    # Fail on a batch that does not divide the data axes before any expensive work.
    sharder.batch((cfg.batch_size, cfg.data.seq_len))

    loaded = loaded or load_for_training(cfg)
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, loaded.tokenizer, loaded.config.vocab_size)
    data = prepare_data(cfg, tokenizer)
    train_rows, eval_rows = data["train"], data["eval"]
    steps = total_steps(cfg, len(train_rows))
    accum = cfg.optim.accum_steps
    batches = data_lib.Batches(train_rows, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
    local = cfg.batch_size // jax.process_count()
    held = []
    if eval_rows is not None and len(eval_rows):
        held = data_lib.eval_batches(eval_rows, cfg.batch_size, cfg.log.eval_batches)
        held = [{k: v[jax.process_index() * local:(jax.process_index() + 1) * local] for k, v in b.items()}
                for b in held]

    trainer = Trainer(cfg, loaded.model, steps, sharder)
    loaded = None  # the trainer holds the (prepared) weights now

    ckpts = TrainCheckpoints(os.path.join(out_dir, "checkpoints"), cfg.checkpoint.keep, cfg.checkpoint.keep_best)
    start, meta = 0, {}
    latest = ckpts.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
        meta = ckpts.meta(latest)
        check_resumable(meta, fingerprint, pinned, ckpts.directory)
        if meta.get("train_rows") != len(train_rows):
            raise ConfigError(f"{ckpts.directory}: the checkpoint saw {meta.get('train_rows')} training rows, "
                              f"the data now gives {len(train_rows)}; the data changed since the run began")
        trainer.state = ckpts.restore(latest, abstract_like(trainer.state))
        start = int(trainer.state.step)
    tb = TensorBoardWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1 if latest is not None else None)
    jlog = JsonLog(os.path.join(out_dir, LOG_FILE), resume_step=start if latest is not None else None)

    record: dict[str, Any] = {"mode": cfg.mode, "model": cfg.model, "recipe": cfg.recipe, "steps": steps,
                              "trainable_parameters": trainer.trainable_count(),
                              "frozen_parameters": trainer.frozen_count(),
                              "data": {"examples": data["examples"], "train": data_lib.describe(train_rows),
                                       "eval": data_lib.describe(eval_rows) if eval_rows is not None else None},
                              "devices": jax.device_count(), "mesh": dict(sharder.mesh.shape),
                              "sharding_notes": sorted(set(sharder.notes))[:20], "resumed_from": latest}

    def evaluate(step: int) -> dict | None:
        if not held:
            return None
        ev = trainer.eval_loss(held)
        tb.scalars(step, {"eval/loss": ev["loss"], "eval/ppl": ev["ppl"]})
        jlog.write(step, {"eval/loss": ev["loss"], "eval/ppl": ev["ppl"]})
        return ev

    record["eval_before"] = evaluate(0) if start == 0 else meta.get("eval_before")

    def checkpoint_meta(step: int) -> dict:
        return {"config_fingerprint": fingerprint, "config": pinned, "train_rows": len(train_rows),
                "micro_batches_done": step * accum, "seed": cfg.seed, "eval_before": record["eval_before"]}

    pending: list[dict] = []
    last_eval: dict | None = None
    window_start = time.perf_counter()
    train_log: list[float] = []
    bar = tqdm(total=steps, initial=start, desc=f"train {cfg.mode}", unit="step",
               disable=not cfg.log.progress or jax.process_index() != 0)
    ran = 0
    loop_start = time.perf_counter()
    out_of_time = False
    tokens_seen = 0.0  # input tokens of this invocation's steps
    first_step_s = budget_start = None
    for step in range(start, steps):
        mbs = [batches.micro_batch(step * accum + i) for i in range(accum)]
        metrics = trainer.step(mbs)
        metrics["lr"] = trainer.lr(step)
        pending.append(metrics)
        done = step + 1
        ran += 1
        bar.update(1)
        if ran == 1 and time_budget_s is not None:  # the budget starts once the step is compiled
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - loop_start
            budget_start = time.perf_counter()
        out_of_time = time_budget_s is not None and time.perf_counter() - budget_start >= time_budget_s
        last = done == steps or out_of_time
        if done % cfg.log.every == 0 or last:
            n_steps = len(pending)
            avg = _mean(pending)  # waits for the device: the window's time is compute time
            pending = []
            now = time.perf_counter()
            rate = avg["tokens"] * n_steps / max(now - window_start, 1e-9)
            tokens_seen += avg["tokens"] * n_steps
            scalars = {"train/loss": avg["loss"], "train/lr": avg["lr"], "train/grad_norm": avg["grad_norm"],
                       "train/target_tokens": avg["target_tokens"], "throughput/tokens_per_s": rate,
                       "throughput/tokens_per_s_per_device": rate / jax.device_count()}
            tb.scalars(done, scalars)
            jlog.write(done, scalars)
            train_log.append(avg["loss"])
            bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{avg['lr']:.2e}")
            record["tokens_per_s"] = rate
            window_start = time.perf_counter()
        evaluated = False
        if (cfg.log.eval_every and done % cfg.log.eval_every == 0) or last:
            last_eval = evaluate(done)
            evaluated = True
        if cfg.log.sample_every and (done % cfg.log.sample_every == 0 or last):
            for i, (prompt, text) in enumerate(_samples(trainer, tokenizer, cfg)):
                tb.text(done, f"samples/{i}", f"**{prompt}**\n\n{text}")
                jlog.write(done, {f"samples/{i}": text})
        save_now = last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0)
        if save_now:
            if cfg.checkpoint.keep_best and held and not evaluated:
                last_eval = evaluate(done)
            ckpts.save(done, trainer.state, checkpoint_meta(done), eval_loss=last_eval["loss"] if last_eval else None)
        if evaluated or save_now:
            tb.flush()
            if not pending:  # evaluation and saving are not training time
                window_start = time.perf_counter()
        if out_of_time:
            break
        if stop_after is not None and ran >= stop_after and not last:
            break
    bar.close()
    ckpts.wait()
    tb.close()
    if trainer.step_count < steps and not out_of_time:  # interrupted on purpose
        ckpts.close()
        return {"stopped_at": trainer.step_count}

    if last_eval is None and held:
        last_eval = trainer.eval_loss(held)
    best = ckpts.best_step()
    ckpts.close()
    outputs = save_outputs(trainer, cfg, tokenizer, os.path.join(out_dir, "final"))
    record.update({"steps_done": trainer.step_count,
                   "stopped_by_time_budget": out_of_time and trainer.step_count < steps,
                   "training_seconds": round(time.perf_counter() - loop_start, 1), "tokens_seen": int(tokens_seen),
                   "first_step_seconds": None if first_step_s is None else round(first_step_s, 1),
                   "eval_after": last_eval, "train_loss_last": train_log[-1] if train_log else None,
                   "best_step": best, "outputs": outputs, "config": cfg_dict,
                   "seconds": round(time.time() - start_time, 1), **provenance()})
    if jax.process_index() == 0:
        write_json(os.path.join(out_dir, "results.json"), record)
    return record
