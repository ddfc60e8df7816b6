"""The result cache: a second run does no model work; a run killed mid-task resumes from its
finished chunks and gives the same numbers; the record carries its provenance."""

import os
import signal
import subprocess
import sys
import time

import pytest

import eval_tiny
from jaxcompress.eval import runner, zeroshot
from jaxcompress.eval.metrics import multiple_choice, summarize
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.scoring import Scorer
from jaxcompress.io.load import load_model

PROBE_STARTS: list[int] = []  # chunk starts the probe task computed in this process


@register_task("resume_probe")
def resume_probe(loaded, opts):
    """COPA scored in chunks of 2 items; sleeps after each chunk when asked (to be killed)."""
    items = zeroshot.DOCS["copa"](opts.data_dir)[:opts.limit]
    scorer = Scorer(loaded)
    delay = float(os.environ.get("PROBE_DELAY", "0"))

    def run(chunk, start):
        PROBE_STARTS.append(start)
        requests = [r for item in chunk for r in item.requests()]
        lls = [lp for lp, _ in scorer.loglikelihood(requests, progress=False)]
        out = [{"lls": lls[2 * j:2 * j + 2], **multiple_choice(lls[2 * j:2 * j + 2], it.choices, it.gold)}
               for j, it in enumerate(chunk)]
        time.sleep(delay)
        return out

    per_item = runner.map_chunks("resume_probe", items, run, chunk_size=2)
    return {**summarize(per_item, ["acc", "acc_norm"]), "lls": [p["lls"] for p in per_item]}


def _evaluate(folder, cache_dir, tasks, limit, load_fn=None, use_cache=True, out=None):
    return runner.evaluate(load_fn or (lambda: load_model(folder)), model_spec=folder, recipe=None, overrides=[],
                           tasks=tasks, opts=TaskOptions(limit=limit), out=out, use_cache=use_cache,
                           dtype="float32", cache_dir=cache_dir)


CODE = "test-code-version"  # other work in a shared tree must not change the key mid-test


def child_main(folder: str, cache_dir: str) -> None:
    """Entry point of the subprocess that gets killed."""
    runner.code_version = lambda: CODE
    _evaluate(folder, cache_dir, ["resume_probe"], 12)


@pytest.fixture(scope="module")
def folder():
    return eval_tiny.tiny_model()[0]


@pytest.fixture(autouse=True)
def fixed_code_version(monkeypatch):
    monkeypatch.setattr(runner, "code_version", lambda: CODE)


def test_cell_key_covers_model_recipe_task_options_and_code():
    ident = {"model": "m", "weights": "w", "recipe": None, "dtype": "float32"}
    key = runner.cell_key(ident, "copa", TaskOptions(limit=5), "c1")
    assert key == runner.cell_key(dict(ident), "copa", TaskOptions(limit=5, batch_size=64), "c1")  # speed only
    assert key == runner.cell_key(ident, "copa", TaskOptions(limit=5, extra={"batch_tokens": 9}), "c1")
    for other in (runner.cell_key({**ident, "weights": "w2"}, "copa", TaskOptions(limit=5), "c1"),
                  runner.cell_key({**ident, "recipe": {"recipe": "gptq"}}, "copa", TaskOptions(limit=5), "c1"),
                  runner.cell_key(ident, "piqa", TaskOptions(limit=5), "c1"),
                  runner.cell_key(ident, "copa", TaskOptions(limit=6), "c1"),
                  runner.cell_key(ident, "copa", TaskOptions(limit=5, extra={"num_fewshot": 3}), "c1"),
                  runner.cell_key(ident, "copa", TaskOptions(limit=5), "c2")):
        assert other != key


def test_second_run_does_no_model_work(folder, tmp_path):
    loads = []

    def load_fn():
        loads.append(1)
        return load_model(folder)

    first = _evaluate(folder, str(tmp_path), ["copa", "winogrande"], 6, load_fn, out=str(tmp_path / "r.json"))
    assert len(loads) == 1 and first["results"]["copa"]["n"] == 6

    def must_not_load():
        raise AssertionError("a cached evaluation loaded the model")

    second = _evaluate(folder, str(tmp_path), ["copa", "winogrande"], 6, must_not_load)
    assert second["results"] == first["results"]
    assert all(t["cached"] for t in second["timing"].values())
    # Other options are another cell; --no-cache recomputes (same numbers).
    third = _evaluate(folder, str(tmp_path), ["copa"], 4, load_fn)
    assert len(loads) == 2 and third["results"]["copa"]["n"] == 4
    forced = _evaluate(folder, str(tmp_path), ["copa", "winogrande"], 6, load_fn, use_cache=False)
    assert len(loads) == 3 and forced["results"] == first["results"]
    # The record says what produced the numbers.
    for key in ("model", "fingerprint", "recipe", "task_options", "versions", "git_commit", "code_version", "device"):
        assert key in first
    assert first["versions"]["jax"] and first["task_options"]["limit"] == 6
    assert os.path.isfile(tmp_path / "r.json")
    table = runner.results_table(first["results"], first["timing"])
    assert "copa" in table and "acc=" in table and "±" in table


def test_killed_run_resumes_with_identical_numbers(folder, tmp_path):
    cache = str(tmp_path / "cache")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    code = (f"import sys; sys.path[:0] = [{here!r}, {root!r}]; import test_eval_runner as t; "
            f"t.child_main({folder!r}, {cache!r})")
    env = dict(os.environ, PROBE_DELAY="1.0", JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    partial_files = []
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        partials = [os.path.join(cache, d) for d in os.listdir(cache) if d.endswith(".partial")] \
            if os.path.isdir(cache) else []
        partial_files = [f for p in partials for f in os.listdir(p) if f.endswith(".json")]
        if len(partial_files) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert 2 <= len(partial_files) < 6
    assert not [f for f in os.listdir(cache) if f.endswith(".json")]  # no finished cell

    done = len([f for p in os.listdir(cache) if p.endswith(".partial")
                for f in os.listdir(os.path.join(cache, p)) if f.endswith(".json")])
    PROBE_STARTS.clear()
    resumed = _evaluate(folder, cache, ["resume_probe"], 12)
    assert sorted(PROBE_STARTS) == list(range(2 * done, 12, 2))  # only the unfinished chunks ran
    PROBE_STARTS.clear()
    fresh = _evaluate(folder, str(tmp_path / "fresh"), ["resume_probe"], 12, use_cache=False)
    assert len(PROBE_STARTS) == 6
    assert resumed["results"] == fresh["results"]
    assert not [d for d in os.listdir(cache) if d.endswith(".partial")]  # cleaned up when finished


def test_baseline_record_from_raw_records(tmp_path):
    """scripts/eval_baseline.py --record: per-task records of separate runs add up to one record,
    with our numbers beside the published ones, the ARC average computed from ours, the missing
    tasks named and the heatmaps copied."""
    import json

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import eval_baseline

    raw = tmp_path / "run" / "raw"
    raw.mkdir(parents=True)
    prov = {"model": "smollm2-135m", "dtype": "auto", "fingerprint": "f", "versions": {"jax": "x"},
            "git_commit": "abc", "device": "gpu:Test x1", "code_version": "c"}
    results = {"hellaswag": {"n": 10042, "acc": 0.33, "acc_norm": 0.41, "acc_norm_stderr": 0.005},
               "arc_easy": {"n": 2376, "acc": 0.55, "acc_norm": 0.50},
               "arc_challenge": {"n": 1172, "acc": 0.25, "acc_norm": 0.30},
               "passkey": {"n": 2, "acc": 0.5, "grid": {"1024": {"0": 1.0, "1": 0.0}}}}
    for task, res in results.items():
        (raw / f"{task}.json").write_text(json.dumps({**prov, "results": {task: res},
                                                      "timing": {task: {"seconds": 12.5, "cached": False}},
                                                      "task_options": {"limit": None}}))
    (raw / "passkey_heatmap.png").write_bytes(b"png")
    out = tmp_path / "docs"
    record = eval_baseline.write_record(str(tmp_path / "run"), str(out))
    assert list(record["results"]) == ["hellaswag", "arc_easy", "arc_challenge", "passkey"]  # TASKS order
    assert "mmlu" in record["missing_tasks"] and "hellaswag" not in record["missing_tasks"]
    assert eval_baseline._ours(record["results"], "arc_average", "acc_norm") == pytest.approx(0.40)
    md = (out / "baseline_smollm2.md").read_text()
    assert "| hellaswag | 10042 | acc_norm | 41.00 ± 0.50 | 12.5 |" in md
    assert "| arc_average | acc_norm | 40.00 | 37.3 |" in md  # the model card's ARC (Average)
    assert "| mmlu | acc | not run | 29.3 |" in md
    assert (out / "baseline_smollm2_passkey_heatmap.png").read_bytes() == b"png"
    assert json.loads((out / "baseline_smollm2.json").read_text())["device"] == "gpu:Test x1"
    assert "- hellaswag: 12.5 s on gpu:Test x1 (target 120 s on one H100): met on this card; not measured on an " \
        "H100" in md
    # A task whose scorer changed after the run keeps its measured number, marked stale.
    record = eval_baseline.write_record(str(tmp_path / "run"), str(out), stale={"arc_easy": "prompt fixed"},
                                        code_note="plus local edits")
    md = (out / "baseline_smollm2.md").read_text()
    assert "| arc_easy | 2376 | acc | 55.00 (stale) | 12.5 |" in md and "- arc_easy (stale): prompt fixed" in md
    assert "commit abc (plus local edits)" in md and record["stale"] == {"arc_easy": "prompt fixed"}
    assert "| hellaswag | 10042 | acc_norm | 41.00 ± 0.50 | 12.5 |" in md  # the others are not
    with pytest.raises(SystemExit, match="mmlu"):
        eval_baseline.write_record(str(tmp_path / "run"), str(out), stale={"mmlu": "x"})
    # Notes kept beside the raw records come back on a plain rebuild.
    (tmp_path / "run" / "record_notes.json").write_text(json.dumps(
        {"code_note": "kept note", "notes": ["checked on the CPU"], "stale": {"passkey": "grid changed"}}))
    record = eval_baseline.write_record(str(tmp_path / "run"), str(out))
    md = (out / "baseline_smollm2.md").read_text()
    assert "commit abc (kept note)" in md and "- checked on the CPU" in md
    assert "| passkey | 2 | acc | 50.00 (stale) |" in md
