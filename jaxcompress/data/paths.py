"""Where evaluation and calibration data come from.

Resolution order: an explicit `--data-dir`, then `$JAXCOMPRESS_DATA`, then `../shared/data`
beside the project root (the layout of the development and CI machines). Callers that can
fall back to the Hugging Face hub do so when no local folder is found.
"""

from __future__ import annotations

import os

from jaxcompress.errors import UserError

ENV_VAR = "JAXCOMPRESS_DATA"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(os.path.dirname(PROJECT_ROOT), "shared", "data")


def data_dir(explicit: str | None = None, required: bool = True) -> str | None:
    """The data folder, or None (when not `required`) if none is configured or present."""
    for candidate, origin in ((explicit, "--data-dir"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if candidate:
            if not os.path.isdir(candidate):
                raise UserError(f"{origin}={candidate}: no such folder")
            return candidate
    if os.path.isdir(SHARED_DATA):
        return SHARED_DATA
    if required:
        raise UserError(f"no data folder: pass --data-dir, set ${ENV_VAR}, or place the data at {SHARED_DATA}")
    return None


def data_path(*parts: str, data_dir: str | None = None) -> str:
    """Path of a file inside the data folder; a clear error when it is missing."""
    root = globals()["data_dir"](data_dir)
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise UserError(f"{path}: data file not found (data folder {root}); see ../shared/data/README.md")
    return path
