"""Generation-based tasks: GSM8K answer extraction, pass@k, MT-Bench against a judge server on
127.0.0.1, long-context prompts and grids, HumanEval end to end on a tiny model."""

import http.server
import json
import math
import os
import threading

import numpy as np
import pytest

import eval_tiny
from jaxcompress.eval import generation, gsm8k, humaneval, longcontext, metrics, mtbench, sandbox
from jaxcompress.eval.registry import TaskOptions
from jaxcompress.eval.runner import artifacts_in
from jaxcompress.io.load import load_model


@pytest.fixture(scope="module")
def loaded():
    folder, _, _ = eval_tiny.tiny_model()
    return load_model(folder)


# ------------------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("text, strict, flexible", [
    ("There are 15 trees. 21 - 15 = 6. The answer is 6.", "6", "6"),
    ("So she has $1,234.50 left. The answer is $1,234.50.", "1234.5", "1234.5"),
    ("The answer is 18.00", "18", "18"),
    ("He lost money. The answer is -7.\n\n", "-7", "-7"),
    ("I think it is 42", None, "42"),
    ("no numbers here", None, None),
    ("The answer is 5. Q: Next question has 7 apples", "5", "7"),  # strict: first, flexible: last
    ("The total is 1,000,000 dollars.", None, "1000000"),
    ("the answer is 0.50.", "0.5", "0.5"),
    ("Step 1: 3 * 4 = 12.\nStep 2: 12 + 30 = 42.", None, "42"),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    assert metrics.extract_answer(text) == (strict, flexible)


def test_gsm8k_gold_and_score():
    assert metrics.gsm8k_gold("48/2 = <<48/2=24>>24\n#### 1,234") == "1234"
    answer = "Janet sells 9 eggs.\n#### 18"
    assert gsm8k.score("She makes 9 * 2 = 18 dollars. The answer is 18.", answer) == \
        {"exact_match": 1.0, "exact_match_flexible": 1.0}
    assert gsm8k.score("She makes 18 dollars, not 20", answer) == {"exact_match": 0.0, "exact_match_flexible": 0.0}
    assert gsm8k.score("The answer is 18.0, I think", answer)["exact_match"] == 1.0
    p = gsm8k.prompt("How many?")
    assert p.startswith("Q: There are 15 trees in the grove.") and p.endswith("\n\nQ: How many?\nA:")
    assert p.count("The answer is") == 8


# ------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_equals_closed_form():
    for n in (1, 5, 20, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 10, 100):
                if k > n:
                    continue
                closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(metrics.pass_at_k(n, c, k) - closed) < 1e-12, (n, c, k)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(10, 0, 5) == 0.0 and metrics.pass_at_k(10, 6, 5) == 1.0
    with pytest.raises(ValueError):
        metrics.pass_at_k(5, 1, 10)


def test_humaneval_end_to_end(loaded):
    """Two real problems through generation and the sandbox; a tiny random model fails them,
    the canonical solutions pass."""
    problems = humaneval.load()[:2]
    from jaxcompress.eval.sandbox import Limits, check_programs, humaneval_program

    ok = check_programs([humaneval_program(p, p["canonical_solution"]) for p in problems], Limits(timeout_s=10))
    assert all(o.passed for o in ok)
    mode = sandbox.isolation()  # the full isolation where this machine has it (CI: root + unshare)
    out = humaneval.humaneval_task(loaded, TaskOptions(limit=2, extra={"max_new_tokens": 8, "samples": 2,
                                                                       "sandbox": mode}))
    assert out["n"] == 2 and out["pass@1"] == 0.0 and out["pass@1_sampled"] == 0.0 and out["samples"] == 2
    assert out["sandbox"] == mode


def test_humaneval_refuses_without_namespaces(loaded, monkeypatch):
    """Without network/PID/mount namespaces the generated code is not run unless the weaker mode
    is asked for; as root even `auto` refuses. The refusal comes before any generation."""
    monkeypatch.setattr(sandbox, "isolation", lambda: "audit-hook")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    for policy in ("namespaces", "auto"):
        with pytest.raises(sandbox.SandboxError, match="refusing to run generated code"):
            sandbox.require(policy)
    assert sandbox.require("audit-hook") == "audit-hook"
    with pytest.raises(sandbox.SandboxError, match="unknown sandbox policy"):
        sandbox.require("none")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    assert sandbox.require("auto") == "audit-hook"  # not root: the audit hook is the documented fallback
    with pytest.raises(sandbox.SandboxError, match="refusing"):
        sandbox.require("namespaces")
    monkeypatch.setattr(humaneval, "generate_batched", lambda *a, **k: pytest.fail("generated before refusing"))
    with pytest.raises(sandbox.SandboxError):
        humaneval.humaneval_task(loaded, TaskOptions(limit=1))


# -------------------------------------------------------------------------------- generation
def test_length_bucket_ladder():
    assert [generation.length_bucket(n) for n in (1, 64, 65, 200, 256, 257, 384, 385, 512, 513, 921, 1025)] == \
        [64, 64, 128, 256, 256, 384, 384, 512, 512, 768, 1024, 1536]


def test_generate_batched_padding_and_batching_do_not_change_greedy_output(loaded):
    """Prompts of several lengths, batched two rows at a time and padded far beyond their length,
    give what `models.generate` gives for them in one batch."""
    from jaxcompress.models.generate import generate

    tok = loaded.tokenizer
    texts = ["The tower is", "In 1999 the band released a new album called", "It", "He said that the game"]
    prompts = [generation.encode_text(tok, t) for t in texts]
    reference = generate(loaded, prompts, max_new_tokens=6)  # one batch, padded to 64 tokens
    budget = 2 * (384 + 64)  # two rows per batch, each padded to 300 -> 384 prompt tokens
    batched = generation.generate_batched(loaded, prompts, max_new_tokens=6, batch_tokens=budget, min_length=300,
                                          progress=False)
    assert batched == reference
    assert sum(len(a) for a in reference) > 0


# ----------------------------------------------------------------------------------- MT-Bench
class JudgeServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that rates by prompt kind and records
    what it was sent."""

    RATINGS = {("single", 1): 6, ("single", 2): 4, ("math", 1): 9, ("math", 2): 3}

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                user = body["messages"][1]["content"]
                kind = "math" if "Reference" in user or "reference" in body["messages"][0]["content"] else "single"
                turn = 2 if "### User:" in user else 1
                reply = f"The assistant did fine. Rating: [[{outer.RATINGS[(kind, turn)]}]]"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_mtbench_with_a_judge_server(loaded, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    with JudgeServer() as judge:
        opts = TaskOptions(limit=1, extra={"judge_url": judge.url, "judge_model": "judge-1",
                                           "judge_api_key_env": "MY_JUDGE_KEY", "max_new_tokens": 4,
                                           "categories": ["writing", "math"]})
        out = mtbench.mtbench_task(loaded, opts)
    assert out["n"] == 2 and out["unparsed_judgments"] == 0
    # writing: single-v1 (6) then multi-turn (4); math: with reference (9) then multi-turn (3).
    assert out["categories"] == {"math": 6.0, "writing": 5.0}
    assert out["score_turn1"] == 7.5 and out["score_turn2"] == 3.5 and out["score"] == 5.5
    assert len(judge.requests) == 4
    path, auth, body = judge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    sent = [r[2]["messages"][1]["content"] for r in judge.requests]
    questions, _, refs = mtbench.load(categories=["math"], per_category=1)
    q = questions[0]
    math_prompts = [s for s in sent if q["turns"][0] in s]
    assert any(refs[q["question_id"]][0] in s for s in math_prompts)  # the GPT-4 reference is shown
    assert any(refs[q["question_id"]][1] in s and q["turns"][1] in s for s in math_prompts)


def test_judge_messages_and_rating_parse():
    questions, prompts, refs = mtbench.load(per_category=1)
    writing = next(q for q in questions if q["category"] == "writing")
    msgs = mtbench.judge_messages(writing, ["first answer", "second answer"], 2, prompts, refs)
    assert msgs[0]["content"] == prompts["single-v1-multi-turn"]["system_prompt"]
    assert "### Assistant A:\nfirst answer" in msgs[1]["content"] and writing["turns"][1] in msgs[1]["content"]
    assert mtbench.parse_rating("Rating: [[7]]") == 7.0
    assert mtbench.parse_rating("I give [8.5]") == 8.5
    assert mtbench.parse_rating("no verdict") == -1.0
    assert len(mtbench.load()[0]) == 80


# ------------------------------------------------------------------------------ long context
def test_passkey_prompt_length_and_depth(loaded):
    tok = loaded.tokenizer
    for length in (512, 2048):
        for depth in (0.0, 0.5, 1.0):
            ids = longcontext.passkey_prompt(tok, length, depth, "31415")
            assert abs(len(ids) - length) <= 0.05 * length
            text = tok.decode(ids)
            at = text.index("The pass key is 31415")
            before, after = text[:at].count("The sky is blue."), text[at:].count("The sky is blue.")
            assert before > 0 or depth == 0.0
            assert before == round((before + after) * depth), (length, depth, before, after)


def test_needle_prompt_and_score(loaded):
    tok = loaded.tokenizer
    ids = longcontext.needle_prompt(tok, 1024, 0.5)
    text = tok.decode(ids)
    assert abs(len(ids) - 1024) <= 64
    before = text[:text.index(longcontext.NEEDLE.strip())]
    assert before.rstrip().endswith(".")  # inserted at a sentence end
    assert abs(len(before) / len(text) - 0.5) < 0.1
    assert longcontext.needle_score("Eat a Sandwich in Dolores Park.") == 1.0
    assert longcontext.needle_score("Eat a sandwich.") == 0.0


def test_passkey_grid_and_heatmap(loaded, tmp_path):
    opts = TaskOptions(extra={"lengths": [256, 100_000], "depths": [0.0, 1.0], "trials": 1, "max_new_tokens": 4})
    with artifacts_in(str(tmp_path)):
        out = longcontext.passkey_task(loaded, opts)
    assert out["n"] == 2 and out["skipped_lengths"] == [100_000]  # beyond max_position_embeddings
    assert set(out["grid"]) == {"256"} and set(out["grid"]["256"]) == {"0", "1"}
    assert os.path.isfile(out["heatmap"]) and out["heatmap"].startswith(str(tmp_path))
    assert np.isclose(out["acc"], np.mean(list(out["grid"]["256"].values())))
