"""Metrics: multiple-choice accuracy, means with standard errors, pass@k, answer extraction.

Conventions follow lm-evaluation-harness: `acc` picks the choice with the highest summed
log-likelihood, `acc_norm` divides it by the choice's length in characters (the choice text
without the leading target delimiter); ties go to the first choice (`np.argmax`).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

import numpy as np


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's and lm-eval's rule)."""
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def multiple_choice(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc and acc_norm of one item. An empty choice counts as length 1 for acc_norm (lm-eval
    would divide by zero)."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.asarray([max(1, len(c)) for c in choices], dtype=np.float64)
    return {"acc": float(argmax_first(lls) == gold), "acc_norm": float(argmax_first(lls / lengths) == gold)}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for n < 2)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size < 2:
        return float(arr.mean()), 0.0
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


def summarize(per_item: Sequence[dict], keys: Sequence[str]) -> dict:
    """{key: mean, key_stderr: stderr} over items, plus n."""
    out: dict = {"n": len(per_item)}
    for k in keys:
        mean, err = mean_stderr([item[k] for item in per_item])
        out[k] = mean
        out[f"{k}_stderr"] = err
    return out


# ------------------------------------------------------------------------------------ pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ------------------------------------------------------------------------------ number answers
_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"The answer is\s*(" + _NUMBER + r")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str | None) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-0' -> '0'; None when not a number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(completion: str) -> tuple[str | None, str | None]:
    """(strict, flexible) final numbers of a chain-of-thought completion.

    strict: the number after the first "The answer is" (the 8-shot exemplars' format);
    flexible: the last number anywhere in the text. Both normalised with `normalize_number`.
    """
    strict = _STRICT.findall(completion)
    numbers = _ANY_NUMBER.findall(completion)
    return (normalize_number(strict[0]) if strict else None,
            normalize_number(numbers[-1]) if numbers else None)


def gsm8k_gold(answer: str) -> str:
    """The reference number after '####' in a GSM8K answer."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    gold = normalize_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"GSM8K answer ends in a non-number: {answer[-80:]!r}")
    return gold
