"""MT-Bench: 80 two-turn questions in 8 categories, answered in the chat template, graded 1-10
by a judge with FastChat's single-answer prompts (and GPT-4 reference answers for math,
reasoning and coding).

Answers follow FastChat's `gen_model_answer`: temperature 0.7 for writing and roleplay, 0.1 for
stem and humanities, greedy otherwise; up to 1024 new tokens per turn. The judge is either an
OpenAI-compatible chat endpoint (`--task-opt judge_url=http://host:port/v1 judge_model=NAME`,
API key from $OPENAI_API_KEY or the variable named by `judge_api_key_env`) or a local
jaxcompress model (`--task-opt judge_local=SPEC`, e.g. a checkpoint folder). Turn 1 is judged
with `single-v1` / `single-math-v1`, turn 2 with the `-multi-turn` prompts; the rating is the
number in "[[n]]". Reported: `score` (mean over all rated turns), `score_turn1`, `score_turn2`,
per-category means, and how many judgments could not be parsed. `--limit N` takes the first N
questions of each category; `--task-opt categories=[math,writing]` only those categories.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request

from jaxcompress.data.paths import data_path
from jaxcompress.errors import UserError
from jaxcompress.eval.generation import encode_chat, generate_batched
from jaxcompress.eval.metrics import mean_stderr
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.runner import map_chunks

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
NEED_REFERENCE = ("math", "reasoning", "coding")
MAX_NEW_TOKENS = 1024
JUDGE_MAX_TOKENS = 2048
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")


def _jsonl(name: str, data_dir=None) -> list[dict]:
    with open(data_path("mtbench", name, data_dir=data_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(data_dir=None, per_category: int | None = None,
         categories: list[str] | None = None) -> tuple[list[dict], dict, dict]:
    """(questions, judge prompts by name, reference turns by question id)."""
    questions = _jsonl("question.jsonl", data_dir)
    if categories:
        unknown = set(categories) - {q["category"] for q in questions}
        if unknown:
            raise UserError(f"mtbench: unknown categories {sorted(unknown)}; choose from {sorted(TEMPERATURE)}")
        questions = [q for q in questions if q["category"] in categories]
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            if seen[q["category"]] <= per_category:
                kept.append(q)
        questions = kept
    prompts = {p["name"]: p for p in _jsonl("judge_prompts.jsonl", data_dir)}
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl("reference_answer_gpt-4.jsonl", data_dir)}
    return questions, prompts, refs


def judge_messages(question: dict, answers: list[str], turn: int, prompts: dict, refs: dict) -> list[dict]:
    """The judge's conversation for one turn (1 or 2) of one answered question."""
    with_ref = question["category"] in NEED_REFERENCE
    name = ("single-math-v1" if with_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    q = question["turns"]
    fields = {"question": q[0], "answer": answers[0], "question_1": q[0], "question_2": q[1],
              "answer_1": answers[0], "answer_2": answers[1]}
    if with_ref:
        if question["question_id"] not in refs:
            raise UserError(f"MT-Bench question {question['question_id']} ({question['category']}) has no "
                            f"reference answer in reference_answer_gpt-4.jsonl")
        r = refs[question["question_id"]]
        fields.update(ref_answer_1=r[0], ref_answer_2=r[1])
    return [{"role": "system", "content": p["system_prompt"]},
            {"role": "user", "content": p["prompt_template"].format(**fields)}]


def parse_rating(judgment: str) -> float:
    """The rating in '[[n]]' (or '[n]'); -1 when there is none (FastChat's convention)."""
    m = _RATING.search(judgment) or _RATING_LOOSE.search(judgment)
    return float(m.group(1)) if m else -1.0


# ------------------------------------------------------------------------------------- judges
class EndpointJudge:
    """An OpenAI-compatible `/chat/completions` endpoint, called with urllib."""

    def __init__(self, url: str, model: str, api_key: str | None = None, retries: int = 3, timeout: float = 300):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.retries, self.timeout = model, api_key, retries, timeout

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        return [self._one(c) for c in conversations]

    def _one(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": JUDGE_MAX_TOKENS}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503) and attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise UserError(f"judge {self.url} answered HTTP {e.code}: {e.read()[:200]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise UserError(f"cannot reach the judge at {self.url} ({e}); check judge_url") from None
            except (KeyError, IndexError, json.JSONDecodeError) as e:
                raise UserError(f"judge {self.url} sent a response that is not an OpenAI chat "
                                f"completion ({type(e).__name__}: {e})") from None
        raise AssertionError("unreachable")


class LocalJudge:
    """A jaxcompress model as the judge (greedy, its chat template)."""

    def __init__(self, loaded, max_new_tokens: int = 512, batch_tokens: int | None = None):
        self.loaded, self.max_new_tokens, self.batch_tokens = loaded, max_new_tokens, batch_tokens

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        prompts = [encode_chat(self.loaded.tokenizer, c) for c in conversations]
        room = self.loaded.config.max_position_embeddings - self.max_new_tokens
        prompts = [p[-room:] for p in prompts]  # keep the end (the verdict instructions) if too long
        if not prompts:
            return []
        return generate_batched(self.loaded, prompts, max_new_tokens=self.max_new_tokens, desc="judge",
                                batch_tokens=self.batch_tokens, min_length=max(len(p) for p in prompts))


def make_judge(opts: TaskOptions, loaded):
    extra = opts.extra
    if extra.get("judge_url"):
        key_env = extra.get("judge_api_key_env", "OPENAI_API_KEY")
        return EndpointJudge(str(extra["judge_url"]), str(extra.get("judge_model", "gpt-4")),
                             os.environ.get(key_env)), f"{extra['judge_url']}#{extra.get('judge_model', 'gpt-4')}"
    if extra.get("judge_local"):
        spec = str(extra["judge_local"])
        budget = int(extra.get("judge_max_new_tokens", 512))
        if spec == "self":
            return LocalJudge(loaded, budget, extra.get("batch_tokens")), f"local:{loaded.spec}"
        from jaxcompress.io.load import load_model

        judge = load_model(spec, dtype=loaded.model.dtype, param_dtype=loaded.model.dtype)
        return LocalJudge(judge, budget, extra.get("batch_tokens")), f"local:{spec}"
    raise UserError("mtbench needs a judge: --task-opt judge_url=http://HOST:PORT/v1 --task-opt judge_model=NAME "
                    "(an OpenAI-compatible endpoint), or --task-opt judge_local=SPEC (a jaxcompress model; "
                    "'self' = the model under test)")


# -------------------------------------------------------------------------------------- task
def answer_questions(loaded, questions: list[dict], max_new_tokens: int, seed: int,
                     batch_tokens: int | None = None) -> list[list[str]]:
    """Two-turn answers; questions of one temperature are generated together, turn by turn."""
    answers: list[list[str]] = [[] for _ in questions]
    by_temp: dict[float, list[int]] = {}
    for i, q in enumerate(questions):
        by_temp.setdefault(TEMPERATURE.get(q["category"], 0.7), []).append(i)
    for temp, idx in sorted(by_temp.items()):
        # Both turns padded to one length (a bound on the second turn's prompt): one compiled
        # program per temperature.
        first = max(len(encode_chat(loaded.tokenizer, [{"role": "user", "content": questions[i]["turns"][0]}]))
                    for i in idx)
        second = max(len(encode_chat(loaded.tokenizer, [{"role": "user", "content": questions[i]["turns"][1]}]))
                     for i in idx)
        pad = min(first + max_new_tokens + second, loaded.config.max_position_embeddings - max_new_tokens)
        for turn in range(2):
            prompts = []
            for i in idx:
                messages = []
                for t in range(turn + 1):
                    messages.append({"role": "user", "content": questions[i]["turns"][t]})
                    if t < turn:
                        messages.append({"role": "assistant", "content": answers[i][t]})
                prompts.append(encode_chat(loaded.tokenizer, messages))
            outs = generate_batched(loaded, prompts, max_new_tokens=max_new_tokens, temperature=temp,
                                    seed=seed + turn, min_length=pad, batch_tokens=batch_tokens,
                                    desc=f"mtbench turn {turn + 1} (T={temp})")
            for i, o in zip(idx, outs):
                answers[i].append(o.strip())
    return answers


@register_task("mtbench")
def mtbench_task(loaded, opts: TaskOptions) -> dict:
    categories = opts.extra.get("categories")
    questions, prompts, refs = load(opts.data_dir, opts.limit,
                                    [categories] if isinstance(categories, str) else categories)
    judge, judge_name = make_judge(opts, loaded)
    max_new = int(opts.extra.get("max_new_tokens", MAX_NEW_TOKENS))
    seed = int(opts.extra.get("seed", 0))
    chunk = int(opts.extra.get("chunk_size", 40))
    answers = map_chunks("mtbench-answers", questions,
                         lambda qs, start: answer_questions(loaded, list(qs), max_new, seed + start,
                                                           opts.extra.get("batch_tokens")), chunk)

    def grade(pairs, start):
        convs = [judge_messages(q, a, turn, prompts, refs) for q, a in pairs for turn in (1, 2)]
        judgments = judge(convs)
        return [{"turn1": parse_rating(judgments[2 * j]), "turn2": parse_rating(judgments[2 * j + 1]),
                 "judgment1": judgments[2 * j][-300:], "judgment2": judgments[2 * j + 1][-300:]}
                for j in range(len(pairs))]

    grades = map_chunks("mtbench-judge", list(zip(questions, answers)), grade, chunk)
    rated = [(q["category"], turn, g[f"turn{turn}"]) for q, g in zip(questions, grades) for turn in (1, 2)]
    valid = [r for r in rated if r[2] >= 0]
    score, err = mean_stderr([s for _, _, s in valid])
    out = {"n": len(questions), "score": score, "score_stderr": err, "judge": judge_name,
           "unparsed_judgments": len(rated) - len(valid)}
    for turn in (1, 2):
        out[f"score_turn{turn}"] = mean_stderr([s for _, t, s in valid if t == turn])[0]
    out["categories"] = {c: mean_stderr([s for cat, _, s in valid if cat == c])[0]
                         for c in sorted({q["category"] for q in questions})}
    out["examples"] = [{"question_id": q["question_id"], "answers": a} for q, a in zip(questions[:2], answers[:2])]
    return out
