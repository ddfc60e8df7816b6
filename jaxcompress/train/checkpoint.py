"""Training checkpoints with an orbax `CheckpointManager`: keep the last k and the best.

A checkpoint holds what a run needs to continue exactly: the step, the fp32 trainable
parameters, the optimizer state, the run's RNG key, and (as JSON) the data position and a
fingerprint of every config value that shapes the state or the data. Frozen weights are not
stored: they are rebuilt from the config (model, recipe, quantization), which the fingerprint
pins. Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves at most a temporary folder, which is ignored and cleaned up.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

from jaxcompress.errors import CheckpointError

# Config keys that may change between a run and its resumption: logging, saving and the device
# layout do not touch the state or the data; a new `steps`/`epochs` extends (or shortens) a run
# deliberately, with the learning-rate schedule of the new length from then on.
RESUMABLE_KEYS = {"steps", "epochs", "checkpoint", "log", "save", "mesh"}


def config_fingerprint(cfg_dict: dict) -> tuple[str, dict]:
    pinned = {k: v for k, v in cfg_dict.items() if k not in RESUMABLE_KEYS}
    text = json.dumps(pinned, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], pinned


class TrainCheckpoints:
    """Saves and restores `{"state": train state pytree, "meta": json}` per step."""

    def __init__(self, directory: str, keep: int = 2, keep_best: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.keep_best = keep_best
        policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True,
            best_fn=(lambda m: m["eval_loss"]) if keep_best else None, best_mode="min",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.keep_best else None

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, eval_loss: float | None = None) -> None:
        import orbax.checkpoint as ocp

        metrics = {"eval_loss": float(eval_loss)} if (self.keep_best and eval_loss is not None) else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def meta(self, step: int) -> dict:
        """The JSON part of a checkpoint (read before the state, to check compatibility)."""
        import orbax.checkpoint as ocp

        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's metadata "
                                  f"({type(e).__name__}: {e}); delete the folder to start afresh") from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state placed with the shardings of `abstract_state`."""
        import orbax.checkpoint as ocp

        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as e:  # orbax raises many types for a damaged or mismatched tree
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the training state "
                                  f"({type(e).__name__}: {e}); delete the folder to start afresh") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for restoring into the layout of `tree`."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def check_resumable(meta: dict, fingerprint: str, pinned: dict, directory: str) -> None:
    """Refuses to continue a run whose state-shaping config differs from the checkpoint's."""
    if meta.get("config_fingerprint") == fingerprint:
        return
    old = meta.get("config", {})
    changed = sorted(k for k in set(old) | set(pinned) if old.get(k) != pinned.get(k))
    raise CheckpointError(f"{directory}: the checkpoint was written by a run with a different config "
                          f"(changed: {', '.join(changed) or 'unknown'}); use a new --out folder, or "
                          f"set checkpoint.resume=false to start afresh")
