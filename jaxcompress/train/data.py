"""Training data: instruction data with a prompt-masked loss, plain text, packing, batches.

An `Example` is a token sequence and, per token, whether the model is trained to predict it
(instruction data: only the response tokens; plain text: every token). Examples are shuffled
with the run's seed, a held-out part is split off, and the rest are packed into rows of
`seq_len` predictions:

    tokens    [R, L]  the inputs
    targets   [R, L]  the next token of each input
    weights   [R, L]  1.0 where the target counts in the loss (0 on prompts and padding)
    positions [R, L]  0.. within the row, -1 on padding (never attended)

Packing puts whole examples one after another in a row (continuous positions) and starts a
new row when the next one does not fit; an example longer than a row is truncated. The model's
attention has no segment ids, so a packed example can attend to the examples before it in its
row (as in GPT-style packing); `packing: false` gives one example per row. Plain text is cut
into full rows before packing.

Row order: each epoch is a permutation of the rows drawn from (seed, epoch), so the rows of
micro-batch `i` are a pure function of `i`: resuming at a step reproduces the data exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from jaxcompress.errors import ConfigError, UserError

# Files in the shared data folder that a source may name.
NAMED_SOURCES = {
    "alpaca": ("instruct", "alpaca_en_demo.json"),
    "c4": ("c4", "c4_demo_300.jsonl"),
    # Documents 0..1099 are the C4 perplexity text (eval/perplexity.py): train with skip >= 1100.
    "c4_validation": ("c4", "c4_validation_2k.jsonl"),
    "wikitext2": ("wikitext2", "wiki.train.subset.txt"),
    "wiki_demo": ("instruct", "wiki_demo.txt"),
}

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                   " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray    # int32 [n]
    mask: np.ndarray   # bool [n]: ids[j] is a training target (predicted from ids[:j])


@dataclasses.dataclass(frozen=True)
class Rows:
    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    truncated: int = 0  # examples cut to fit a row

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index) -> dict[str, np.ndarray]:
        return {k: getattr(self, k)[index] for k in ("tokens", "targets", "weights", "positions")}


# ------------------------------------------------------------------------------ tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_tokenizer():
    """A byte-level tokenizer (id = byte value, then <|im_start|>, <|im_end|>, <|pad|>) with a
    ChatML chat template: real text for random-weight models with a vocabulary of >= 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>", chat_template=CHATML_TEMPLATE)


def resolve_tokenizer(spec: str | None, model_tokenizer, vocab_size: int):
    """The tokenizer a run uses: the model's (spec None), the byte-level one, or an HF folder."""
    if spec is None:
        tok = model_tokenizer
        if tok is None:
            raise ConfigError("the model has no tokenizer (random weights?): set data.tokenizer "
                              "to 'bytes' or to a tokenizer folder")
    elif spec == "bytes":
        tok = byte_tokenizer()
    else:
        from jaxcompress.io.hf import load_tokenizer

        tok = load_tokenizer(spec)
    if len(tok) > vocab_size:
        raise ConfigError(f"data.tokenizer: the tokenizer has {len(tok)} tokens, the model's vocabulary "
                          f"only {vocab_size}; use the model's own tokenizer")
    return tok


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# ------------------------------------------------------------------------------ instruction data
def to_messages(record: dict, where: str) -> list[dict]:
    """An Alpaca record (instruction/input/output), `messages`, or ShareGPT `conversations`."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "conversations" in record:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}
        return [{"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]]
    if "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise UserError(f"{where}: a record needs instruction/output, messages, or conversations; "
                    f"got keys {sorted(record)}")


def encode_chat(tokenizer, messages: list[dict]) -> Example:
    """Renders with the tokenizer's chat template; only assistant turns are targets.

    Each turn's text is the difference of two renders (conversation so far with a generation
    prompt, and with the turn), tokenized piece by piece so the mask lines up exactly.
    """
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template does not render conversations as prefixes of "
                            "each other, so prompt tokens cannot be masked; use data.template: alpaca")
        for text, target in ((prompt[len(done):], False), (full[len(prompt):], True)):
            piece = _encode(tokenizer, text)
            ids += piece
            mask += [target] * len(piece)
        done = full
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def encode_alpaca(tokenizer, messages: list[dict]) -> Example:
    """The original Alpaca prompt format (for tokenizers without a chat template)."""
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise UserError("data.template: alpaca handles single-turn records; use a chat template for "
                        "multi-turn conversations")
    prompt = ALPACA_PROMPT.format(instruction=messages[0]["content"])
    response = messages[1]["content"] + (tokenizer.eos_token or "")
    p, r = _encode(tokenizer, prompt), _encode(tokenizer, response)
    return Example(np.asarray(p + r, np.int32), np.asarray([False] * len(p) + [True] * len(r), bool))


def read_records(path: str) -> list[dict]:
    """A json list or a jsonl file of records."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records")
    return data


def instruct_examples(path: str, tokenizer, template: str, limit: int | None = None,
                      skip: int = 0) -> list[Example]:
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat but the tokenizer has no chat template; use alpaca")
    encode = encode_chat if template == "chat" else encode_alpaca
    records = read_records(path)[skip:]
    records = records[:limit]
    examples = []
    for i, record in enumerate(records):
        ex = encode(tokenizer, to_messages(record, f"{path} record {i}"))
        if ex.mask.any():
            examples.append(ex)
    return examples


# ------------------------------------------------------------------------------ plain text
def read_documents(path: str, limit: int | None = None, skip: int = 0) -> list[str]:
    """Documents of a .jsonl (field `text`) or a .txt file (paragraphs split by blank lines),
    the first `skip` dropped, then the next `limit` kept."""
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    docs.append(json.loads(line)["text"])
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs = docs[skip:]
    return docs[:limit]


def text_examples(docs: Iterable[str], tokenizer, seq_len: int) -> list[Example]:
    """Documents joined by EOS and cut into pieces of seq_len + 1 tokens (seq_len predictions)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream += _encode(tokenizer, doc) + ([eos] if eos is not None else [])
    n = len(stream) // (seq_len + 1)
    ids = np.asarray(stream[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)
    return [Example(row, np.ones(seq_len + 1, bool)) for row in ids]


def source_path(source, data_dir: str | None) -> str:
    from jaxcompress.data.paths import data_path

    if source.path is not None:
        if not os.path.isfile(source.path):
            raise UserError(f"data source {source.path}: no such file")
        return source.path
    if source.name not in NAMED_SOURCES:
        raise ConfigError(f"data source name {source.name!r}: choose one of {', '.join(NAMED_SOURCES)} "
                          f"or give a path")
    return data_path(*NAMED_SOURCES[source.name], data_dir=data_dir)


def load_examples(data_cfg, tokenizer) -> list[Example]:
    """All examples of all sources, in source order."""
    examples: list[Example] = []
    for source in data_cfg.sources:
        path = source_path(source, data_cfg.data_dir)
        if source.kind == "instruct":
            got = instruct_examples(path, tokenizer, data_cfg.template, source.max_examples, source.skip)
        else:
            got = text_examples(read_documents(path, source.max_examples, source.skip), tokenizer,
                                data_cfg.seq_len)
        if not got:
            raise UserError(f"data source {path}: no training examples (text shorter than one row?)")
        examples += got
    return examples


# ------------------------------------------------------------------------------ packing
def pack(examples: Sequence[Example], seq_len: int, packing: bool, pad_id: int = 0) -> Rows:
    """Rows of seq_len predictions (see the module doc)."""
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a new row first
    truncated = 0
    for ex in examples:
        inputs, targets, weights = ex.ids[:-1], ex.ids[1:], ex.mask[1:].astype(np.float32)
        if len(inputs) > seq_len:
            inputs, targets, weights = inputs[:seq_len], targets[:seq_len], weights[:seq_len]
            truncated += 1
        if len(inputs) == 0 or not weights.any():
            continue
        if not packing or used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets, weights))
        used += len(inputs)
    r = len(rows)
    out = Rows(np.full((r, seq_len), pad_id, np.int32), np.full((r, seq_len), pad_id, np.int32),
               np.zeros((r, seq_len), np.float32), np.full((r, seq_len), -1, np.int32), truncated)
    for i, pieces in enumerate(rows):
        at = 0
        for inputs, targets, weights in pieces:
            n = len(inputs)
            out.tokens[i, at:at + n] = inputs
            out.targets[i, at:at + n] = targets
            out.weights[i, at:at + n] = weights
            out.positions[i, at:at + n] = np.arange(at, at + n)
            at += n
    return out


def split_examples(examples: Sequence[Example], eval_examples: int, seed: int):
    """(train, held-out) after a seeded shuffle."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
    if eval_examples >= len(examples):
        raise ConfigError(f"data.eval_examples={eval_examples} leaves no training data "
                          f"({len(examples)} examples in all)")
    held = [examples[i] for i in order[:eval_examples]]
    train = [examples[i] for i in order[eval_examples:]]
    return train, held


@dataclasses.dataclass
class Batches:
    """Deterministic micro-batches over packed rows: `micro_batch(i)` is a pure function of i.

    Each process of a multi-host run builds only its own `local` slice of the global batch.
    """

    rows: Rows
    batch_size: int          # global rows per micro-batch
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if len(self.rows) == 0:
            raise UserError("no training rows after packing")
        if self.batch_size % self.process_count:
            raise ConfigError(f"batch_size={self.batch_size} must be a multiple of the number of "
                              f"processes ({self.process_count})")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perms[epoch]

    def row_ids(self, index: int) -> np.ndarray:
        """Global row indices of micro-batch `index` that this process loads."""
        local = self.batch_size // self.process_count
        counters = index * self.batch_size + self.process_index * local + np.arange(local)
        n = len(self.rows)
        return np.asarray([self._perm(int(c // n))[c % n] for c in counters])

    def micro_batch(self, index: int) -> dict[str, np.ndarray]:
        return self.rows.take(self.row_ids(index))


def eval_batches(rows: Rows, batch_size: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The held-out rows in fixed batches; the last one padded with empty rows (weight 0)."""
    out = []
    for start in range(0, len(rows), batch_size):
        if limit is not None and len(out) >= limit:
            break
        idx = np.arange(start, start + batch_size)
        batch = rows.take(np.minimum(idx, len(rows) - 1))
        pad = idx >= len(rows)
        batch["weights"][pad] = 0.0
        out.append(batch)
    return out


def describe(rows: Rows) -> dict[str, Any]:
    return {"rows": len(rows), "target_tokens": int(rows.weights.sum()),
            "fill": float((rows.positions >= 0).mean()) if len(rows) else 0.0, "truncated": rows.truncated}
