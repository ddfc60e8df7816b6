"""GSM8K: 8-shot chain of thought, greedy, exact match on the final number.

The prompt is lm-evaluation-harness' `gsm8k_cot` (the eight exemplars of Wei et al., 2022):
"Q: {question}\\nA: {reasoning} The answer is {n}.\\n\\n" eight times, then "Q: {question}\\nA:".
Generation stops at "Q:", "</s>" or "<|im_end|>" (or 256 new tokens). Two scores, as lm-eval:
`exact_match` (strict: the number after "The answer is") and `exact_match_flexible` (the last
number in the completion); numbers are compared after dropping "$", "," and a final ".".
"""

from __future__ import annotations

import json

from jaxcompress.data.paths import data_path
from jaxcompress.eval.generation import encode_text, generate_batched
from jaxcompress.eval.metrics import extract_answer, gsm8k_gold, summarize
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.runner import map_chunks

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 "
     "= 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8. The answer is 8."),
]
STOP = ("Q:", "</s>", "<|im_end|>")
MAX_NEW_TOKENS = 256
CHUNK_ITEMS = 256


def prompt(question: str, num_fewshot: int = 8) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:num_fewshot])
    return shots + f"Q: {question}\nA:"


def load(data_dir=None) -> list[dict]:
    with open(data_path("gsm8k", "test.jsonl", data_dir=data_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score(completion: str, answer: str) -> dict:
    strict, flexible = extract_answer(completion)
    gold = gsm8k_gold(answer)
    return {"exact_match": float(strict == gold), "exact_match_flexible": float(flexible == gold)}


@register_task("gsm8k")
def gsm8k_task(loaded, opts: TaskOptions) -> dict:
    docs = load(opts.data_dir)
    docs = docs if opts.limit is None else docs[:opts.limit]
    k = int(opts.extra.get("num_fewshot", 8))
    max_new = int(opts.extra.get("max_new_tokens", MAX_NEW_TOKENS))
    # Every batch padded to the longest prompt of the task: one compiled program.
    longest = max(len(encode_text(loaded.tokenizer, prompt(d["question"], k))) for d in docs)

    def run(chunk, start):
        prompts = [encode_text(loaded.tokenizer, prompt(d["question"], k)) for d in chunk]
        outs = generate_batched(loaded, prompts, max_new_tokens=max_new, stop=STOP,
                                batch_tokens=opts.extra.get("batch_tokens"), min_length=longest,
                                desc=f"gsm8k {start + len(chunk)}/{len(docs)}")
        return [{"completion": o, **score(o, d["answer"])} for o, d in zip(outs, chunk)]

    per_item = map_chunks("gsm8k", docs, run, int(opts.extra.get("chunk_size", CHUNK_ITEMS)))
    out = summarize(per_item, ["exact_match", "exact_match_flexible"])
    out["num_fewshot"] = k
    out["examples"] = [p["completion"] for p in per_item[:3]]
    return out
