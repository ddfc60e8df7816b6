"""Device mesh and shardings from logical axis rules (the modern pjit: `jax.jit` + `NamedSharding`).

The mesh has three axes: `data` (batch), `fsdp` (batch, and parameters sharded along their
embedding dimension), `tensor` (attention heads, MLP hidden units, vocabulary). Parameters name
*logical* axes by what their dimensions mean; the config's rules map logical axes to mesh axes:

    q_proj.kernel [D, H*Dh]   ("embed", "heads")        rules: batch   -> (data, fsdp)
    o_proj.kernel [H*Dh, D]   ("heads", "embed")               embed   -> fsdp
    up_proj.kernel [D, F]     ("embed", "mlp")                 heads   -> tensor
    embedding [V, D]          ("vocab", "embed")               mlp     -> tensor
    tokens [B, L]             ("batch", None)                  vocab   -> tensor

A compressed leaf shards its arrays consistently with the weight it stands for: LoRA's `a`
like the input dimension, `b` like the output; a QArray's packed codes and group scales only
along the output dimension (its input rows are packed into words). A dimension that the mesh
axes do not divide stays replicated (noted in `notes`), so small models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# (regex over weight names, logical axes of the [in, out] kernel or of the array)
LOGICAL_AXES: list[tuple[str, tuple]] = [
    (r"embed_tokens\.embedding", ("vocab", "embed")),
    (r".*self_attn\.q_proj\.kernel", ("embed", "heads")),
    (r".*self_attn\.(k|v)_proj\.kernel", ("embed", "kv_heads")),
    (r".*self_attn\.o_proj\.kernel", ("heads", "embed")),
    (r".*self_attn\.q_proj\.bias", ("heads",)),
    (r".*self_attn\.(k|v)_proj\.bias", ("kv_heads",)),
    (r".*mlp\.(gate|up)_proj\.kernel", ("embed", "mlp")),
    (r".*mlp\.down_proj\.kernel", ("mlp", "embed")),
    (r"lm_head\.kernel", ("embed", "vocab")),
    (r".*norm\.scale", ("norm",)),
]


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize` for a multi-process run; must run before any JAX computation.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Under SLURM or Open
    MPI with more than one task, JAX detects the cluster itself. Returns whether it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=int(env["JAX_NUM_PROCESSES"]),
                                       process_id=int(env["JAX_PROCESS_ID"]))
        except KeyError as e:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not; a multi-host "
                              f"run needs JAX_NUM_PROCESSES and JAX_PROCESS_ID too") from None
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices do not split into data={data} fsdp={fsdp} "
                              f"tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                          f"devices, but {len(devices)} are available")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # topology helpers refuse some fake/CPU layouts; a plain reshape is valid
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def rules_dict(rules: list) -> dict[str, tuple[str, ...]]:
    """Config rules [[logical, axis | [axes] | null], ...] -> {logical: (mesh axes)}."""
    out = {}
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"mesh.rules: each rule is [logical_axis, mesh_axis or list or null], got {rule!r}")
        logical, target = rule
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for ax in axes:
            if ax not in MESH_AXES:
                raise ConfigError(f"mesh.rules: {logical!r} -> {ax!r}: mesh axes are {', '.join(MESH_AXES)}")
        out[logical] = axes
    return out


@dataclasses.dataclass
class Sharder:
    """Turns logical axes into `NamedSharding`s on a mesh, replicating what does not divide."""

    mesh: Mesh
    rules: dict[str, tuple[str, ...]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def axis_size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def spec(self, shape: tuple[int, ...], logical: tuple, what: str = "") -> PartitionSpec:
        used: set[str] = set()
        parts = []
        for dim, name in zip(shape, logical):
            axes = tuple(a for a in self.rules.get(name, ()) if a not in used and self.mesh.shape[a] > 1) \
                if name else ()
            if axes and dim % self.axis_size(axes):
                self.notes.append(f"{what}: dimension {dim} ({name}) does not divide over {axes}; replicated")
                axes = ()
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def named(self, shape, logical, what="") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(tuple(shape), logical, what))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # -------------------------------------------------------------- parameters
    def leaf(self, value: Any, logical: tuple, name: str) -> Any:
        """Shardings for one weight leaf (a tree of the same structure for compressed leaves)."""
        if value is None:
            return None
        if not dataclasses.is_dataclass(value):
            if len(logical) != np.ndim(value):
                logical = (None,) * np.ndim(value)
            return self.named(np.shape(value), logical, name)
        in_ax, out_ax = (logical + (None, None))[:2] if len(logical) == 2 else (None, None)
        layout = _FIELD_AXES.get(type(value).__name__)
        fields = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("static"):
                continue
            v = getattr(value, f.name)
            if v is None:
                continue
            if layout is None:  # unknown compressed type: replicate its arrays
                fields[f.name] = jax.tree_util.tree_map(lambda _: self.replicated, v)
                continue
            ax = layout.get(f.name, "replicated")
            if ax == "weight":
                fields[f.name] = self.leaf(v, (in_ax, out_ax), f"{name}.{f.name}")
            elif ax == "replicated":
                fields[f.name] = jax.tree_util.tree_map(lambda _: self.replicated, v)
            else:
                axes = tuple({"in": in_ax, "out": out_ax, None: None}[a] for a in ax)
                fields[f.name] = self.leaf(v, axes, f"{name}.{f.name}")
        return dataclasses.replace(value, **fields)

    def params(self, tree: Any) -> Any:
        """A tree of shardings with the structure of the parameter tree."""
        from jaxcompress.train.lora import map_weights

        return map_weights(lambda name, w: self.leaf(w, logical_axes(name), name), tree)

    # -------------------------------------------------------------- batches
    def batch(self, shape: tuple[int, ...], batch_dim: int = 0) -> NamedSharding:
        """Sharding of a [..., B, L] batch array over the rules' `batch` axes; B must divide."""
        axes = tuple(a for a in self.rules.get("batch", ()) if self.mesh.shape[a] > 1)
        size = self.axis_size(axes)
        if shape[batch_dim] % size:
            layout = " x ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
            raise ConfigError(f"batch_size={shape[batch_dim]} does not divide over the data axes "
                              f"({layout} = {size} shards); use a multiple of {size}")
        parts = [None] * len(shape)
        parts[batch_dim] = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, PartitionSpec(*parts))


# How each array field of a compressed leaf relates to the weight's (in, out) axes.
_FIELD_AXES: dict[str, dict[str, Any]] = {
    "LoRA": {"base": "weight", "a": ("in", None), "b": (None, "out"), "dropout_key": "replicated"},
    "QArray": {"codes": (None, "out"), "scale": (None, "out"), "zero": (None, "out"),
               "codebook": ("out", None), "perm": "replicated", "outlier_index": "replicated",
               "outlier_value": "replicated"},
    "FakeQuant": {"w": ("in", "out"), "scale": (None, "out"), "zero": (None, "out")},
}


def logical_axes(name: str) -> tuple:
    for pattern, axes in LOGICAL_AXES:
        if re.fullmatch(pattern, name):
            return axes
    return ()


def sharder_from_config(mesh_cfg, devices=None) -> Sharder:
    mesh = make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)
    return Sharder(mesh, rules_dict(mesh_cfg.rules))
