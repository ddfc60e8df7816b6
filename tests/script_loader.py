"""Load a file under scripts/ as a module (scripts are programs, not a package)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """The module of `ROOT / relative`, e.g. load_script("scripts/bench_kv.py")."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
