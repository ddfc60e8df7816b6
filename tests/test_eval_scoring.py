"""The log-likelihood engine against transformers on real task items, and the multiple-choice
metrics on hand-made items."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import eval_tiny
from jaxcompress.eval import metrics, mmlu, zeroshot
from jaxcompress.eval.scoring import SHARE_MIN_CONTEXT, Scorer, encode_pairs, rolling_windows
from jaxcompress.io.load import load_model
from jaxcompress.models.cache import IdentityCodec

ITEMS_PER_TASK = 2


@pytest.fixture(scope="module")
def tiny():
    folder, hf, tok = eval_tiny.tiny_model()
    return load_model(folder), hf, tok


def lm_eval_pair(tok, context, continuation):
    """lm-evaluation-harness' encoding, written out independently of the library."""
    if context == "":
        return [tok.eos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def hf_loglikelihood(hf, ctx, cont):
    seq = ctx + cont
    with torch.no_grad():
        logits = hf(torch.tensor([seq[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def real_requests():
    """(task, request) for the first items of every log-likelihood task."""
    out = []
    for name, load in zeroshot.DOCS.items():
        for item in load()[:ITEMS_PER_TASK]:
            out.extend((name, r) for r in item.requests())
    out.extend(("lambada_openai", r) for r in zeroshot.lambada_requests()[:ITEMS_PER_TASK])
    for item in mmlu.subject_items("abstract_algebra", limit=1):  # a real 5-shot prompt
        out.extend(("mmlu", r) for r in item.requests())
    return out


@pytest.fixture(scope="module")
def references(tiny):
    """transformers' (log-likelihood, greedy) for each real request."""
    _, hf, tok = tiny
    return [hf_loglikelihood(hf, *lm_eval_pair(tok, ctx, cont)) for _, (ctx, cont) in real_requests()]


def test_encode_pairs_follows_lm_eval(tiny):
    _, _, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    (ctx, cont), (ctx2, cont2), (ctx3, cont3) = encode_pairs(
        tok, [("The cat sat ", "on the mat"), ("", "hello"), ("Answer:", " yes")], prefix_id=tok.eos_token_id)
    # Trailing space moves to the continuation: context "The cat sat", continuation " on the mat".
    assert ctx == enc("The cat sat") and ctx + cont == enc("The cat sat on the mat")
    assert (ctx2, cont2) == ([tok.eos_token_id], enc("hello"))
    assert ctx3 == enc("Answer:") and ctx3 + cont3 == enc("Answer: yes")


def test_real_items_match_transformers(tiny, references):
    """All three device programs: flat rows, shared contexts with multi-token continuations
    (hellaswag's endings after a long context) and single-token continuations (MMLU letters)."""
    loaded, hf, tok = tiny
    tasks, requests = zip(*real_requests())
    # A small token budget forces many batches, padding rows and several shapes.
    ours = Scorer(loaded, batch_tokens=1024).loglikelihood(list(requests), progress=False)
    groups = {}
    for ctx, cont in encode_pairs(tok, requests, tok.eos_token_id):
        groups.setdefault(tuple(ctx), []).append(len(cont))
    shared = [v for k, v in groups.items() if len(v) > 1 and len(k) >= max(SHARE_MIN_CONTEXT, 2 * max(v))]
    assert any(max(v) == 1 for v in shared) and any(max(v) > 1 for v in shared)
    assert any(len(v) == 1 for v in groups.values())  # and flat rows
    assert set(tasks) == set(zeroshot.DOCS) | {"lambada_openai", "mmlu"}
    for task, (ctx, cont), (lp, greedy), (ref_lp, ref_greedy) in zip(tasks, requests, ours, references):
        assert abs(lp - ref_lp) < 1e-4, (task, ctx[-40:], cont, lp, ref_lp)
        assert greedy == ref_greedy


def test_flat_path_on_long_contexts_matches(tiny, references):
    """Requests that take the shared-context path, scored as flat rows instead."""
    loaded, hf, tok = tiny
    pairs = [(t, r, ref) for (t, r), ref in zip(real_requests(), references) if t == "hellaswag"]
    ours = Scorer(loaded, share_context=False).loglikelihood([r for _, r, _ in pairs], progress=False)
    for (task, _, (ref_lp, ref_greedy)), (lp, greedy) in zip(pairs, ours):
        assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy, task


def test_kv_codec_path_matches(tiny):
    loaded, hf, tok = tiny
    with_codec = dataclasses.replace(loaded, kv_codec=IdentityCodec())
    requests = [r for item in zeroshot.DOCS["copa"]()[:4] for r in item.requests()]  # one short shape
    plain = Scorer(loaded, share_context=False).loglikelihood(requests, progress=False)
    coded = Scorer(with_codec, share_context=False).loglikelihood(requests, progress=False)
    np.testing.assert_allclose([p[0] for p in coded], [p[0] for p in plain], atol=1e-5, rtol=0)


def test_greedy_continuation_is_detected(tiny):
    """A continuation made of the model's own argmax tokens is greedy; changing one is not."""
    loaded, hf, tok = tiny
    ctx = tok("The history of the city", add_special_tokens=False)["input_ids"]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    cont = seq[len(ctx):]
    wrong = cont[:2] + [(cont[2] + 1) % len(tok)] + cont[3:]
    scorer = Scorer(loaded)
    (lp, greedy), (lp2, greedy2), (lp3, greedy3) = scorer.loglikelihood_tokens(
        [(ctx, cont), (ctx, wrong), (ctx, [])], progress=False)
    assert greedy and not greedy2 and lp > lp2
    assert (lp3, greedy3) == (0.0, True)  # an empty continuation: probability one


def test_rolling_windows_hand_example():
    # lm-eval's docstring example: 10 tokens, max length 4, prefix token P.
    P = -1
    assert rolling_windows(list(range(10)), P, 4) == [([P], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                      ([5, 6, 7], [8, 9])]
    assert rolling_windows([], P, 4) == []


def test_loglikelihood_rolling_matches_transformers(tiny):
    loaded, hf, tok = tiny
    text = zeroshot.lambada_requests()[0][0][:600]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # One window (max_length >= len): the sum of log p(token | prefix token + preceding text).
    full, _ = hf_loglikelihood(hf, [tok.eos_token_id], ids)
    # Several windows of at most 32 inputs: each window scored with its own left context.
    windowed = sum(hf_loglikelihood(hf, c, p)[0] for c, p in rolling_windows(ids, tok.eos_token_id, 32))
    got_full = Scorer(loaded).loglikelihood_rolling([text], progress=False)[0]
    got_windowed = Scorer(loaded, max_length=32).loglikelihood_rolling([text], progress=False)[0]
    assert abs(got_full - full) < 1e-3 and abs(got_windowed - windowed) < 1e-3
    assert abs(full - windowed) > 1e-2  # the windows really lose context


# ---------------------------------------------------------------------------- metrics by hand
def test_multiple_choice_acc_and_acc_norm():
    # Raw log-likelihood prefers the short choice 1; per character, the long choice 0 wins.
    m = metrics.multiple_choice([-4.0, -3.0], ["abcdefgh", "ab"], gold=0)
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    # Ties go to the first choice, in acc and in acc_norm.
    assert metrics.multiple_choice([-2.0, -2.0], ["x", "y"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}
    assert metrics.multiple_choice([-2.0, -2.0], ["x", "y"], gold=1) == {"acc": 0.0, "acc_norm": 0.0}
    # An empty choice has log-likelihood 0 and length 1: it wins both.
    assert metrics.multiple_choice([0.0, -0.5], ["", "a"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}


def test_summarize_mean_and_stderr():
    out = metrics.summarize([{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}], ["acc"])
    assert out["n"] == 4 and out["acc"] == 0.75
    assert abs(out["acc_stderr"] - np.std([1, 0, 1, 1], ddof=1) / 2) < 1e-12


def test_mc_item_requests_use_the_target_delimiter():
    item = zeroshot.choice_item("Question: 2+2?\nAnswer:", ["4", "5"], 0)
    assert item.requests() == [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " 5")]
    wino = zeroshot.DOCS["winogrande"]()[0]
    assert wino.requests()[0] == (wino.contexts[0], " " + wino.choices[0])
    assert len(zeroshot.DOCS["hellaswag"]()) == 10042


def test_mmlu_prompt_is_lm_eval_format():
    item = mmlu.subject_items("abstract_algebra", limit=1)[0]
    ctx = item.contexts[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith("over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert "\nD. 30\nAnswer: A\n\nFind the degree" in ctx and item.continuations == (" A", " B", " C", " D")


def _lm_eval_yaml(*parts):
    """A task YAML shipped with lm-evaluation-harness (the reference for prompt formats)."""
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    import os

    with open(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", *parts)) as f:
        return yaml.safe_load(f)


def test_boolq_items_follow_lm_eval_and_real_answers():
    """BoolQ on real validation items: lm-eval's prompt (boolq default.yaml rendered by lm-eval's
    own Jinja), choices " no"/" yes" in that order, and gold answers checked by hand."""
    cfg = _lm_eval_yaml("super_glue", "boolq", "default.yaml")
    from lm_eval.utils import apply_template

    items = zeroshot.DOCS["boolq"]()
    assert len(items) == 3270 and sum(i.gold for i in items) == 2033  # BoolQ validation: 62.2% True
    assert cfg["doc_to_choice"] == ["no", "yes"] and cfg["doc_to_target"] == "label"
    with open(zeroshot.data_path("zeroshot", "boolq.jsonl")) as f:
        raw = [json.loads(next(f)) for _ in range(6)]
    for item, doc in zip(items, raw):
        passage, question = doc["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)
        lm_doc = {"passage": passage, "question": question.rstrip("?"), "label": doc["gold"]}
        assert item.contexts == (apply_template(cfg["doc_to_text"], lm_doc),)
        assert item.continuations == (" no", " yes") and item.choices == ("no", "yes")
    # Read from the passages: (question, answer).
    expected = {0: ("does ethanol take more energy make that produces", " no"),
                1: ("is house tax and property tax are same", " yes"),
                3: ("is harry potter and the escape from gringotts a roller coaster ride", " yes"),
                5: ("is barq's root beer a pepsi product", " no")}  # Barq's belongs to Coca-Cola
    for i, (question, answer) in expected.items():
        assert items[i].contexts[0].endswith(f"\nQuestion: {question}?\nAnswer:")
        assert items[i].continuations[items[i].gold] == answer


def test_lambada_requests_follow_lm_eval():
    """lambada_openai: context = the text before the last space, target = " " + the last word
    (lm-eval's lambada_openai.yaml, rendered by lm-eval's Jinja)."""
    cfg = _lm_eval_yaml("lambada", "lambada_openai.yaml")
    from lm_eval.utils import apply_template

    requests = zeroshot.lambada_requests()
    assert len(requests) == 5153
    for ctx, cont in requests[:50]:
        doc = {"text": ctx + cont}
        assert (apply_template(cfg["doc_to_text"], doc), apply_template(cfg["doc_to_target"], doc)) == (ctx, cont)
        assert cont.startswith(" ") and " " not in cont[1:]
    assert requests[0][1] == " signs"
