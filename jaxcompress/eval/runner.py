"""Running evaluations: the result cache, resuming, provenance and the summary table.

`evaluate(load_fn, ...)` is what `jaxcompress eval` calls. `load_fn()` returns the (possibly
compressed) LoadedModel; it is called lazily, so a fully cached evaluation loads nothing.

The cache holds one JSON file per (model, recipe, task, task options, code version) cell,
named by a hash of exactly those things (see `cell_key`). While a task runs, the pieces of work
it hands to `map_chunks` are stored one file per chunk beside the cell; a run that is killed
resumes from the finished chunks and, since each chunk is computed from its own items alone,
gives the same numbers. Every file is written atomically (temporary file + rename), so a kill
never leaves a half-written entry.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

from jaxcompress.cache import cache_root, file_fingerprint, folder_fingerprint
from jaxcompress.eval.registry import TaskOptions, get_task
from jaxcompress.io.atomic import write_json
from jaxcompress.provenance import provenance

# Task options that change how fast a result comes, not what it is: left out of the cache key.
SPEED_OPTIONS = ("batch_tokens", "chunk_size", "batch_size", "share_context")
# Packages whose code can change a number; their sources make up the code version.
CODE_PACKAGES = ("eval", "models", "ops", "quant", "kv", "prune", "factorize", "io", "data")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "eval")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the library code that produces numbers (sources of CODE_PACKAGES and of
    pallas_kernels): any edit there invalidates cached results. Computed once per process."""
    h = hashlib.sha256()
    roots = [os.path.join(PACKAGE_ROOT, p) for p in CODE_PACKAGES]
    roots.append(os.path.join(os.path.dirname(PACKAGE_ROOT), "pallas_kernels"))
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    h.update(os.path.relpath(path, PACKAGE_ROOT).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def weights_fingerprint(spec: str, dtype: str) -> str:
    """Identifies the weights `spec` names without loading them (file sizes and mtimes), so
    that a cached evaluation can be answered before any model is read."""
    from jaxcompress.io import load as io_load

    if spec.startswith("random:"):
        return f"random-{spec}-seed0-{dtype}"
    path = spec
    if spec == io_load.DEFAULT_MODEL:
        path = io_load.smollm2_gguf_path()
    if os.path.isfile(path):
        return "file-" + file_fingerprint(path) + f"-{dtype}"
    if os.path.isdir(path):
        return "dir-" + folder_fingerprint(path) + f"-{dtype}"
    return f"hub-{spec}-{dtype}"  # a hub id: the revision is not known without a download


def recipe_identity(recipe: str | None, overrides: Sequence[str]) -> dict | None:
    """What the recipe is: its file's content hash when it is a file (or a name in
    configs/recipes), else its name; plus the command-line overrides."""
    if not recipe:
        return None
    candidates = [recipe, os.path.join(os.path.dirname(PACKAGE_ROOT), "configs", "recipes", recipe + ".yaml")]
    content = None
    for c in candidates:
        if os.path.isfile(c):
            with open(c, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()[:16]
            break
    return {"recipe": recipe, "content": content, "overrides": list(overrides)}


def task_options_key(opts: TaskOptions) -> dict:
    return {"limit": opts.limit, "seqlen": opts.seqlen,
            "extra": {k: v for k, v in sorted(opts.extra.items()) if k not in SPEED_OPTIONS}}


def cell_key(identity: dict, task: str, opts: TaskOptions, code: str) -> str:
    blob = json.dumps({"identity": identity, "task": task, "options": task_options_key(opts), "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------ chunked resume
_PARTIAL_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("partial_dir", default=None)
_ARTIFACT_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("artifact_dir", default=None)


@contextlib.contextmanager
def artifacts_in(folder: str | None):
    """Within this block, `artifact_path` puts task artifacts (plots) in `folder`."""
    token = _ARTIFACT_DIR.set(folder)
    try:
        yield
    finally:
        _ARTIFACT_DIR.reset(token)


def artifact_path(filename: str) -> str:
    """Where a task writes a file it makes (a heatmap): beside the results JSON when there is
    one, else in the cache's artifacts folder."""
    folder = _ARTIFACT_DIR.get() or os.path.join(default_cache_dir(), "artifacts")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, filename)


@contextlib.contextmanager
def partial_results(folder: str | None):
    """Within this block, `map_chunks` stores each finished chunk in `folder` (None: nowhere)."""
    token = _PARTIAL_DIR.set(folder)
    try:
        yield
    finally:
        _PARTIAL_DIR.reset(token)


def map_chunks(name: str, items: Sequence[Any], fn: Callable[[Sequence[Any], int], list],
               chunk_size: int) -> list:
    """`fn(chunk, start)` over consecutive chunks of `items`, concatenated.

    Each chunk's result (a JSON-serialisable list, one entry per item) is stored while a cached
    evaluation runs, and reused when the same task is resumed. `fn` must depend only on its
    chunk and start index (seed samplers from them), so that resumed numbers are identical.
    """
    folder = _PARTIAL_DIR.get()
    out: list = []
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        path = os.path.join(folder, f"{name}-{start:08d}-{len(chunk)}.json") if folder else None
        if path and os.path.isfile(path):
            with open(path) as f:
                out.extend(json.load(f))
            continue
        result = list(fn(chunk, start))
        if len(result) != len(chunk):
            raise RuntimeError(f"{name}: chunk at {start} returned {len(result)} results for {len(chunk)} items")
        if path:
            write_json(path, result)
        out.extend(result)
    return out


# ------------------------------------------------------------------------------------- running
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Evaluation:
    """Evaluates tasks for one model through the cache. `load_fn` runs at most once, and only
    when a task is not cached."""

    def __init__(self, load_fn: Callable[[], Any], identity: dict, *, cache_dir: str | None = None,
                 use_cache: bool = True):
        self.load_fn = load_fn
        self.identity = identity
        self.cache_dir = cache_dir or default_cache_dir()
        self.use_cache = use_cache
        self.code = code_version()
        self._loaded = None

    @property
    def loaded(self):
        if self._loaded is None:
            self._loaded = self.load_fn()
        return self._loaded

    def cell_path(self, task: str, opts: TaskOptions) -> str:
        return os.path.join(self.cache_dir, f"{task}-{cell_key(self.identity, task, opts, self.code)}.json")

    def run(self, tasks: Sequence[str], opts: TaskOptions) -> tuple[dict, dict]:
        """({task: metrics}, {task: {"seconds", "cached"}})."""
        fns = {t: get_task(t) for t in tasks}  # fail on a bad name before any work
        results, timing = {}, {}
        for i, task in enumerate(tasks, 1):
            path = self.cell_path(task, opts)
            if self.use_cache and os.path.isfile(path):
                with open(path) as f:
                    entry = json.load(f)
                results[task] = entry["result"]
                timing[task] = {"seconds": entry["seconds"], "cached": True}
                _log(f"[{i}/{len(tasks)}] {task}: cached ({path})")
                continue
            partial = path[:-len(".json")] + ".partial"
            if not self.use_cache and os.path.isdir(partial):
                shutil.rmtree(partial)
            resumed = os.path.isdir(partial) and bool(os.listdir(partial))
            _log(f"[{i}/{len(tasks)}] {task}: running" + (" (resuming finished chunks)" if resumed else ""))
            start = time.time()
            with partial_results(partial):
                result = fns[task](self.loaded, opts)
            seconds = round(time.time() - start, 2)
            write_json(path, {"task": task, "identity": self.identity, "options": task_options_key(opts),
                              "code_version": self.code, "result": result, "seconds": seconds})
            shutil.rmtree(partial, ignore_errors=True)
            results[task] = result
            timing[task] = {"seconds": seconds, "cached": False}
        return results, timing


def evaluate(load_fn, *, model_spec: str, recipe: str | None, overrides: list[str], tasks: list[str],
             opts: TaskOptions, out: str | None, use_cache: bool = True, dtype: str = "auto",
             cache_dir: str | None = None) -> dict:
    """Runs `tasks` (through the cache), prints the summary table, writes the record to `out`."""
    start = time.time()
    identity = {"model": model_spec, "weights": weights_fingerprint(model_spec, dtype),
                "recipe": recipe_identity(recipe, overrides), "dtype": dtype}
    ev = Evaluation(load_fn, identity, cache_dir=cache_dir, use_cache=use_cache)
    with artifacts_in(os.path.dirname(os.path.abspath(out)) if out else None):
        results, timing = ev.run(tasks, opts)
    loaded = ev._loaded
    record = {"model": model_spec, "fingerprint": loaded.fingerprint if loaded else identity["weights"],
              "recipe": loaded.recipe if loaded else recipe, "overrides": overrides, "dtype": dtype,
              "task_options": opts.as_dict(), "results": results, "timing": timing,
              "code_version": ev.code, "seconds": round(time.time() - start, 2), **provenance()}
    if out:
        write_json(out, record)
    print(results_table(results, timing))
    return record


# -------------------------------------------------------------------------------- the summary
# Metrics shown in the table, in this order (others stay in the JSON).
SHOWN = ("ppl", "acc", "acc_norm", "exact_match", "exact_match_flexible", "pass@1", "pass@10", "score",
         "score_turn1", "score_turn2", "accuracy", "acc_macro")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def results_table(results: dict[str, dict], timing: dict | None = None) -> str:
    """A plain-text table: one row per task, its headline metrics with standard errors."""
    rows = [("task", "n", "metrics", "time")]
    for task, metrics in results.items():
        shown = []
        for k in SHOWN:
            if k in metrics and isinstance(metrics[k], (int, float)):
                err = metrics.get(f"{k}_stderr")
                shown.append(f"{k}={_fmt(metrics[k])}" + (f"±{err:.4f}" if isinstance(err, float) else ""))
        if not shown:  # a task with other metric names: show its numbers
            shown = [f"{k}={_fmt(v)}" for k, v in metrics.items()
                     if k != "n" and not k.endswith("_stderr") and isinstance(v, (int, float))][:6]
        t = (timing or {}).get(task, {})
        when = "cached" if t.get("cached") else (f"{t['seconds']:.1f}s" if "seconds" in t else "")
        rows.append((task, str(metrics.get("n", "")), "  ".join(shown), when))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}".rstrip())
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
