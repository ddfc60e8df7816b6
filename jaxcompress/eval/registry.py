"""Evaluation tasks by name.

A task is `fn(loaded: LoadedModel, opts: TaskOptions) -> dict` returning its metrics and `n`
(the number of items or windows scored). Register with `@register_task("name")`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxcompress.errors import UserError

TaskFn = Callable[..., dict]
_TASKS: dict[str, TaskFn] = {}


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    limit: int | None = None        # first N items / windows only
    seqlen: int = 2048              # perplexity window (and max context for other tasks)
    batch_size: int = 8
    data_dir: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # task-specific options

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    def decorator(fn: TaskFn) -> TaskFn:
        _TASKS[name] = fn
        return fn

    return decorator


def _load_builtin_tasks() -> None:
    """Imports the modules that register tasks (kept lazy: they pull in heavy deps)."""
    import importlib

    for module in ("jaxcompress.eval.perplexity", "jaxcompress.eval.tasks"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> TaskFn:
    _load_builtin_tasks()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def run_tasks(loaded, tasks: list[str], opts: TaskOptions) -> dict[str, dict]:
    """Runs each task in order; returns {task: metrics}."""
    fns = [get_task(t) for t in tasks]  # fail on a bad name before any work
    return {t: fn(loaded, opts) for t, fn in zip(tasks, fns)}
