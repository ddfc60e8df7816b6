"""The lm-evaluation-harness adapter, offline: local task YAMLs that point at local files, run
through lm-eval with our model and with lm-eval's own Hugging Face backend on the same tiny
checkpoint; the per-request numbers must agree."""

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the `dev` extra installs it

import eval_tiny  # noqa: E402
from jaxcompress.data.paths import data_path  # noqa: E402

TASKS = {
    "jc_copa_local": """
task: jc_copa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {copa}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "jc_rolling_local": """
task: jc_rolling_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    "jc_generate_local": """
task: jc_generate_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gsm8k}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    texts = root / "texts.jsonl"
    with open(data_path("wikitext2", "wiki.test.raw")) as f:
        paragraphs = [p for p in f.read().split("\n") if len(p) > 200][:3]
    texts.write_text("".join(json.dumps({"text": p[:400]}) + "\n" for p in paragraphs))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, yaml in TASKS.items():
        (tasks / f"{name}.yaml").write_text(yaml.format(copa=data_path("zeroshot", "copa.jsonl"), texts=texts,
                                                        gsm8k=data_path("gsm8k", "test.jsonl")))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")
    folder, _, _ = eval_tiny.tiny_model()
    return folder, str(tasks)


def _run(model, model_args, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only our local task YAMLs: indexing lm-eval's thousands of built-in tasks takes a minute.
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), limit=2, log_samples=True,
                           task_manager=manager, bootstrap_iters=0)


def test_adapter_matches_lm_eval_hf_backend(setup):
    import jaxcompress.eval.lm_eval_adapter  # noqa: F401  (registers "jaxcompress")

    folder, tasks_dir = setup
    ours = _run("jaxcompress", f"model={folder},dtype=float32", tasks_dir)
    ref = _run("hf", f"pretrained={folder},dtype=float32,device=cpu", tasks_dir)
    for task in TASKS:
        a = sorted(ours["samples"][task], key=lambda s: (s["doc_id"]))
        b = sorted(ref["samples"][task], key=lambda s: (s["doc_id"]))
        assert len(a) == len(b) == 2
        for sa, sb in zip(a, b):
            if task == "jc_generate_local":
                assert sa["resps"] == sb["resps"], (sa["resps"], sb["resps"])
                continue
            flat_a = [r[0] if isinstance(r[0], (int, float)) else r[0][0] for r in sa["resps"]]
            flat_b = [r[0] if isinstance(r[0], (int, float)) else r[0][0] for r in sb["resps"]]
            tol = 1e-3 if task == "jc_rolling_local" else 1e-4  # rolling: a sum over ~100 tokens
            assert max(abs(x - y) for x, y in zip(flat_a, flat_b)) < tol, (task, flat_a, flat_b)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jc_copa_local"][metric] == ref["results"]["jc_copa_local"][metric]


def test_pth_hook_registers_the_model_for_plain_lm_eval(tmp_path, monkeypatch):
    """The .pth line that `install` writes, processed as site-packages would, makes lm-eval's
    own registry find "jaxcompress" (and keeps its built-in models)."""
    from jaxcompress.eval import lm_eval_adapter

    monkeypatch.setattr(lm_eval_adapter, "pth_path", lambda: str(tmp_path / lm_eval_adapter.PTH_NAME))
    path = lm_eval_adapter.install_hook()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(lm_eval_adapter.__file__))))
    code = ("import site, sys; site.addsitedir(sys.argv[1]);"
            "from lm_eval.api.registry import get_model;"
            "print(get_model('jaxcompress').__name__, get_model('hf').__name__)")
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["JaxCompressLM", "HFLM"]
