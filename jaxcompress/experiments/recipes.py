"""Compression recipes: YAML files of sections, each applied by the module that owns it.

    recipe = load_recipe("gptq_w4_g128", ["calibration.num_samples=32"])
    loaded = apply_recipe(loaded, recipe)        # loaded.recipe records what was done

A name resolves to `configs/recipes/<name>.yaml`; a path is read as is. Every section is
filled with its defaults before the `--set key.sub=value` overrides are applied, so any field
can be overridden, and a key no section knows is an error naming it.

Built-in sections: `weights:` (weight-only PTQ, `jaxcompress.quant.config`) and
`calibration:` (the data calibrated methods use, `jaxcompress.data.calibration`). Other
modules add theirs with

    register_recipe_section("kv_cache", apply_fn, normalize=None)

where `apply_fn(loaded, section)` (or `apply_fn(loaded, section, ctx)` with a
`RecipeContext`: the whole recipe, the data folder, a logger) returns the new LoadedModel, or
(LoadedModel, record) to add a record to `loaded.recipe["applied"][name]`; `normalize(section)`
returns the section with defaults filled and raises `ConfigError` for bad keys or values.
Sections are applied in registration order (weights first). A module that registers a
section on import is listed in `SECTION_MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any, Callable

from jaxcompress.data.calibration import CalibrationConfig
from jaxcompress.data.paths import PROJECT_ROOT
from jaxcompress.errors import ConfigError, UserError
from jaxcompress.overrides import apply_overrides, load_yaml
from jaxcompress.quant.config import CALIBRATED, from_dict, parse_weights, to_dict

RECIPES_DIR = os.path.join(PROJECT_ROOT, "configs", "recipes")
META_KEYS = ("name", "description")
# Modules that register recipe sections when imported (imported before a recipe is read).
SECTION_MODULES: list[str] = ["jaxcompress.kv.recipe"]


@dataclasses.dataclass(frozen=True)
class RecipeContext:
    recipe: dict
    data_dir: str | None = None
    log: Callable[[str], None] | None = None


@dataclasses.dataclass(frozen=True)
class _Section:
    apply: Callable | None
    normalize: Callable[[dict], dict] | None


_SECTIONS: dict[str, _Section] = {}


def register_recipe_section(name: str, apply_fn: Callable | None,
                            normalize: Callable[[dict], dict] | None = None) -> None:
    """Adds a top-level recipe section (see the module docstring)."""
    if name in META_KEYS:
        raise ValueError(f"{name!r} is reserved in recipes")
    _SECTIONS[name] = _Section(apply_fn, normalize)


def _load_section_modules() -> None:
    for module in SECTION_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def recipe_names() -> list[str]:
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def recipe_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    if not name_or_path.endswith((".yaml", ".yml")) and os.sep not in name_or_path:
        path = os.path.join(RECIPES_DIR, name_or_path + ".yaml")
        if os.path.isfile(path):
            return path
        raise UserError(f"unknown recipe {name_or_path!r}: no {path}; available: {', '.join(recipe_names())}")
    raise UserError(f"{name_or_path}: no such recipe file")


def _normalize(recipe: dict, where: str) -> dict:
    out = {}
    for key, value in recipe.items():
        if key in META_KEYS:
            out[key] = value
            continue
        if key not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section {key!r}; known: {', '.join(list(_SECTIONS) + list(META_KEYS))}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: section {key} must be a mapping")
        normalize = _SECTIONS[key].normalize
        out[key] = normalize(value) if normalize else value
    # Calibrated methods always record the calibration they used: fill in the defaults.
    if out.get("weights", {}).get("method") in CALIBRATED and "calibration" not in out:
        out["calibration"] = _normalize_calibration({})
    return out


def load_recipe(name_or_path: str | dict, overrides: list[str] | None = None) -> dict:
    """The recipe as a plain dict: sections with defaults filled, overrides applied, validated."""
    _load_section_modules()
    overrides = list(overrides or [])
    if isinstance(name_or_path, dict):
        raw, where, name, source = name_or_path, "recipe", name_or_path.get("name", "inline"), None
    else:
        source = recipe_path(name_or_path)
        raw, where = load_yaml(source), source
        name = os.path.splitext(os.path.basename(source))[0]
    raw = {k: v for k, v in raw.items() if k not in ("source", "overrides", "applied")}
    recipe = _normalize(raw, where)
    recipe = _normalize(apply_overrides(recipe, overrides, strict=True, name=f"recipe {name}"), where)
    recipe.setdefault("name", name)
    recipe["source"] = source
    recipe["overrides"] = overrides
    return recipe


def _call(fn: Callable, loaded, section: dict, ctx: RecipeContext):
    params = inspect.signature(fn).parameters
    return fn(loaded, section, ctx) if len(params) >= 3 else fn(loaded, section)


def apply_recipe(loaded, recipe: dict | str, data_dir: str | None = None,
                 log: Callable[[str], None] | None = None):
    """A new LoadedModel with every section of the recipe applied; `loaded` is unchanged.
    The result's `recipe` is the recipe plus `applied`: each section's record."""
    if not isinstance(recipe, dict) or "source" not in recipe:
        recipe = load_recipe(recipe)
    ctx = RecipeContext(recipe, data_dir, log)
    applied = {}
    for name, section in _SECTIONS.items():
        if name not in recipe or section.apply is None:
            continue
        out = _call(section.apply, loaded, recipe[name], ctx)
        if isinstance(out, tuple):
            loaded, applied[name] = out
        else:
            loaded = out
    return dataclasses.replace(loaded, recipe={**recipe, "applied": applied})


# ------------------------------------------------------------------------ built-in sections
def _normalize_weights(section: dict) -> dict:
    weights = parse_weights(section)
    out = to_dict(weights.layer)
    out["targets"] = weights.targets
    out["rules"] = [{k: v for k, v in dataclasses.asdict(r).items() if v not in (None, False)}
                    for r in weights.rules]
    return out


def _normalize_calibration(section: dict) -> dict:
    return dataclasses.asdict(from_dict(CalibrationConfig, section, "calibration"))


def _apply_weights(loaded, section: dict, ctx: RecipeContext):
    from jaxcompress.quant.pipeline import quantize_weights

    calibration = None
    if "calibration" in ctx.recipe:
        calibration = from_dict(CalibrationConfig, ctx.recipe["calibration"], "calibration")
    model, record = quantize_weights(loaded.model, parse_weights(section), calibration,
                                     tokenizer=loaded.tokenizer, data_dir=ctx.data_dir, log=ctx.log)
    return dataclasses.replace(loaded, model=model), record


register_recipe_section("weights", _apply_weights, _normalize_weights)
register_recipe_section("calibration", None, _normalize_calibration)


def describe(recipe: dict) -> str:
    """One line: method, bits, grouping (for logs and tables)."""
    w = recipe.get("weights")
    if not w:
        return recipe.get("name", "recipe")
    group = w["group_size"] if isinstance(w["group_size"], str) else f"g{w['group_size']}"
    return f"{w['method']} w{w['bits']} {group}{' sym' if w['symmetric'] else ''}"


def as_overrides(values: dict[str, Any]) -> list[str]:
    """{"weights.bits": 3} -> ["weights.bits=3"] (values written as YAML scalars)."""
    import yaml

    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]
