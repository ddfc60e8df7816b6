"""What makes a result reproducible: versions, git commit, device."""

from __future__ import annotations

import functools
import os
import platform
import subprocess


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout (with -dirty), or $JAXCOMPRESS_GIT_COMMIT where there is no .git
    (the GPU machine receives a copy of the working tree without history)."""
    if os.environ.get("JAXCOMPRESS_GIT_COMMIT"):
        return os.environ["JAXCOMPRESS_GIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def device_description() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def provenance() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "device": device_description()}
