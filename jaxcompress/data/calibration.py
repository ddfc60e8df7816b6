"""Calibration data: windows of tokens drawn from a text, and a record of exactly what was used.

    calibration:
      source: wikitext2     # wikitext2 | c4 | gsm8k | alpaca | wiki | random | path/to/file(.txt|.jsonl|.json)
      num_samples: 128      # sequences
      seqlen: 2048          # tokens per sequence
      seed: 0
      batch_size: 8         # sequences per forward pass of the calibration engine (memory only)

A text source is tokenized once as a whole; each sample is a window of `seqlen` tokens at an
offset drawn uniformly with `seed` (the reference GPTQ / AWQ samplers draw random windows
too). Named sources are local files under the data folder (see ../shared/data/README.md):

    wikitext2  WikiText-2 raw train text (generic calibration, the published GPTQ/AWQ choice)
    c4         C4 documents set aside for calibration (generic, web text)
    gsm8k      GSM8K train questions and answers (domain-matched for GSM8K)
    alpaca     Alpaca-style instructions and responses (domain-matched for chat)
    wiki       Wikipedia articles

A .jsonl file contributes each record's `text` field, or else its string fields joined;
`random` draws uniform token ids (for random-weight models with no tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from jaxcompress.data.paths import data_path
from jaxcompress.errors import ConfigError, UserError

SOURCES = {
    "wikitext2": ("wikitext2", "wiki.train.subset.txt"),
    "c4": ("c4", "c4_demo_300.jsonl"),
    "gsm8k": ("gsm8k", "train.jsonl"),
    "alpaca": ("instruct", "alpaca_en_demo.json"),
    "wiki": ("instruct", "wiki_demo.txt"),
}
DOC_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    source: str = "wikitext2"
    num_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        for name in ("num_samples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"calibration.{name}={value!r} must be a positive integer")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"calibration.seed={self.seed!r} must be an integer")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"calibration.source={self.source!r} must be a source name or a file path")


@dataclasses.dataclass
class CalibrationSet:
    tokens: np.ndarray  # [num_samples, seqlen] int32
    record: dict        # what was used: source, file and its sha256, offsets, token hash, ...


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_text(record: dict) -> str:
    if "text" in record and isinstance(record["text"], str):
        return record["text"]
    if "question" in record and "answer" in record:  # GSM8K
        return f"Question: {record['question']}\nAnswer: {record['answer']}"
    if "instruction" in record:  # Alpaca
        prompt = record["instruction"] + (("\n" + record["input"]) if record.get("input") else "")
        return f"{prompt}\n{record.get('output', '')}"
    return "\n".join(v for v in record.values() if isinstance(v, str))


def read_text(path: str) -> str:
    """The calibration text of a .txt, .jsonl or .json (list of records) file."""
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                docs = [_record_text(json.loads(line)) for line in f if line.strip()]
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise UserError(f"{path}: a .json calibration file must hold a list of records")
            docs = [_record_text(r) if isinstance(r, dict) else str(r) for r in data]
        else:
            with open(path, encoding="utf-8") as f:
                return f.read()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read calibration text ({type(e).__name__}: {e})") from None
    return DOC_SEPARATOR.join(d for d in docs if d)


def source_path(source: str, data_dir: str | None = None) -> str:
    if source in SOURCES:
        return data_path(*SOURCES[source], data_dir=data_dir)
    if os.path.isfile(source):
        return source
    raise UserError(f"calibration.source={source!r}: not a known source ({', '.join(SOURCES)}, random) "
                    f"nor an existing file")


_TOKEN_CACHE: dict[tuple, np.ndarray] = {}


def _tokenize(tokenizer, path: str) -> np.ndarray:
    """The whole text of `path` as token ids (cached per file version and tokenizer)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, getattr(tokenizer, "name_or_path", ""),
           len(tokenizer), type(tokenizer).__name__)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_CACHE[key] = np.asarray(ids, dtype=np.int32)
    return _TOKEN_CACHE[key]


def sample_windows(stream: np.ndarray, num_samples: int, seqlen: int, seed: int, what: str):
    """(tokens [num_samples, seqlen], offsets) of uniformly drawn windows of a token stream."""
    if len(stream) < seqlen:
        raise UserError(f"{what}: {len(stream)} tokens, fewer than calibration.seqlen={seqlen}; "
                        f"use a shorter seqlen or a larger source")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(stream) - seqlen + 1, size=num_samples)
    return np.stack([stream[o:o + seqlen] for o in offsets]).astype(np.int32), offsets


def calibration_set(tokenizer, cfg: CalibrationConfig, data_dir: str | None = None,
                    vocab_size: int | None = None) -> CalibrationSet:
    """Draws the calibration sequences `cfg` describes; the record says exactly what they are."""
    record = dataclasses.asdict(cfg)
    if cfg.source == "random":
        if vocab_size is None:
            raise UserError("calibration.source=random needs the model's vocabulary size")
        rng = np.random.default_rng(cfg.seed)
        tokens = rng.integers(0, vocab_size, size=(cfg.num_samples, cfg.seqlen)).astype(np.int32)
        record.update(kind="uniform random token ids", vocab_size=vocab_size)
    else:
        if tokenizer is None:
            raise UserError(f"calibration.source={cfg.source}: this model has no tokenizer; use "
                            f"calibration.source=random for random-weight models")
        path = source_path(cfg.source, data_dir)
        stream = _tokenize(tokenizer, path)
        tokens, offsets = sample_windows(stream, cfg.num_samples, cfg.seqlen, cfg.seed, path)
        covered = len(np.unique(np.concatenate([np.arange(o, o + cfg.seqlen) for o in offsets])))
        record.update(path=os.path.abspath(path), file_sha256=_sha256(path), stream_tokens=int(len(stream)),
                      distinct_tokens_covered=int(covered), offsets=[int(o) for o in offsets],
                      tokenizer=getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    record["tokens_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    return CalibrationSet(tokens, record)
