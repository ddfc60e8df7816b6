"""Triton's asynchronous-copy pipeliner for Pallas loops that have no dot.

Triton turns a loop's global loads into `cp.async` copies into shared memory, issued several
iterations ahead (LDGSTS in the SASS), only for loads that feed a `tt.dot`, unless the loop
itself carries a `tt.num_stages` attribute: what `tl.range(..., num_stages=n)` sets in Triton
(`AssignLatencies.cpp`: `pipelineWithoutDot`). The global `num_stages` of a Pallas kernel does
not set it, and Pallas' Triton lowering has no way to. So the KV decode passes, which reduce on
the CUDA cores, loaded in step with their arithmetic (kv_notes.md run 15).

`staged_name(name, stages)` marks a `pallas_call` by its name. The hook `install()` puts on
Pallas' Triton lowering sets `tt.num_stages = stages` on the innermost `scf.for` loops of every
kernel so marked, as its Triton module is built; other kernels are left as they are. Triton
pipelines only loads of at least 4 contiguous bytes a thread (`isSmallLoad`), and only inner loops.

The hook wraps a private jax function (`jax._src.pallas.triton.lowering.
lower_jaxpr_to_triton_module`). Where that function is missing, `install()` raises a `ConfigError`
naming it, so a marked kernel is never silently lowered without its stages.
"""

from __future__ import annotations

import re

from jaxcompress.errors import ConfigError

_MARK = "__stages"
_MARKED = re.compile(re.escape(_MARK) + r"(\d+)$")


def staged_name(name: str, stages: int) -> str:
    """`name` marked for `stages` pipeline stages on its innermost loops (0 or 1: unmarked)."""
    if stages < 0:
        raise ConfigError(f"loop stages {stages} for kernel {name!r} must be 0 (off) or at least 2")
    return f"{name}{_MARK}{stages}" if stages > 1 else name


def marked_stages(name: str) -> int:
    """The stages a kernel name asks for (0: unmarked)."""
    found = _MARKED.search(name)
    return int(found.group(1)) if found else 0


def _innermost_loops(op) -> list:
    """The `scf.for` operations under `op` that contain no other `scf.for`."""
    loops = []

    def walk(node) -> bool:  # whether node holds a loop
        holds = False
        for region in node.regions:
            for block in region.blocks:
                for child in block.operations:
                    inner = walk(child.operation)
                    if child.operation.name == "scf.for":
                        if not inner:
                            loops.append(child.operation)
                        holds = True
                    holds = holds or inner
        return holds

    walk(op)
    return loops


def mark_module(module) -> int:
    """Sets `tt.num_stages` on the innermost loops of each marked `tt.func` of a Triton module;
    returns how many loops it marked."""
    from jax._src.lib.mlir import ir

    count = 0
    for func in module.body.operations:
        if func.operation.name != "tt.func":
            continue
        stages = marked_stages(ir.StringAttr(func.attributes["sym_name"]).value)
        if not stages:
            continue
        for loop in _innermost_loops(func.operation):
            loop.attributes["tt.num_stages"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), stages)
            count += 1
    return count


def install() -> None:
    """Wraps Pallas' Triton lowering once per process so that marked kernels get their stages."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError as e:  # pragma: no cover - depends on the jax build
        raise ConfigError(f"loop stages need jax's Pallas Triton lowering ({e}); use stages=0") from e
    original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if original is None:
        raise ConfigError("loop stages: jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module is missing "
                          "in this jax; use stages=0")
    if getattr(original, "_jaxcompress_loop_stages", False):
        return

    def lower_with_stages(*args, **kwargs):
        result = original(*args, **kwargs)
        mark_module(result.module)
        return result

    lower_with_stages._jaxcompress_loop_stages = True
    lowering.lower_jaxpr_to_triton_module = lower_with_stages
