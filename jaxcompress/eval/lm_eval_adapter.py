"""lm-evaluation-harness adapter: any lm-eval task on a (compressed) jaxcompress model.

    lm_eval --model jaxcompress --model_args model=smollm2-135m,recipe=configs/recipes/X.yaml \\
            --tasks hellaswag

Model arguments: model (any `--model` spec), recipe, dtype (auto|float32|bfloat16|float16),
data_dir (calibration data for recipes), max_length (default: the model's
max_position_embeddings), batch_tokens (padded tokens per batch), max_gen_toks (256).

Registration. lm-eval 0.4.x has no plug-in discovery for models: a model exists once a module
that calls `register_model` is imported. Three ways to get that:
  - `python -m jaxcompress.eval.lm_eval_adapter install` writes a `.pth` file into
    site-packages whose hook imports this module right after `lm_eval.models` loads (see
    `lm_eval_hook.py`); from then on the plain `lm_eval` command knows `--model jaxcompress`.
    `... uninstall` removes it.
  - `python -m jaxcompress.eval.lm_eval_adapter run <lm_eval arguments>` (or the console script
    `jaxcompress-lm-eval`) runs lm-eval's CLI with the model registered, installing nothing.
  - In Python: `import jaxcompress.eval.lm_eval_adapter`, then `lm_eval.simple_evaluate(model=
    "jaxcompress", model_args=...)`, or pass a `JaxCompressLM` instance as the model.

All three requests go through jaxcompress' own engines: `loglikelihood` and
`loglikelihood_rolling` through the length-bucketed scorer (jaxcompress.eval.scoring, which
encodes context/continuation exactly as lm-eval's TemplateLM does), `generate_until` through
the batched generator.
"""

from __future__ import annotations

import os
import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

PTH_NAME = "jaxcompress_lm_eval.pth"


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("jaxcompress")
class JaxCompressLM(TemplateLM):
    def __init__(self, model: str = "smollm2-135m", recipe: str | None = None, dtype: str = "auto",
                 data_dir: str | None = None, max_length: int | None = None, batch_tokens: int | None = None,
                 max_gen_toks: int = 256, share_context=True, loaded=None, **unused):
        """`loaded` (Python use only) is an already loaded LoadedModel; otherwise `model` and
        `recipe` are loaded as `jaxcompress eval --model ... --recipe ...` would. lm-eval's
        generic arguments (batch_size, device, ...) are accepted and ignored: batching is by
        tokens, the device is JAX's."""
        super().__init__()
        import argparse

        from jaxcompress.eval.scoring import Scorer

        if loaded is None:
            from jaxcompress.cli import load

            loaded = load(argparse.Namespace(model=model, dtype=dtype, recipe=recipe, overrides=[],
                                             data_dir=data_dir))
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.scorer = Scorer(loaded, max_length=int(max_length) if max_length else None,
                             batch_tokens=int(batch_tokens) if batch_tokens else None,
                             share_context=_as_bool(share_context))
        self.max_gen_toks = int(max_gen_toks)
        self.batch_tokens = int(batch_tokens) if batch_tokens else None

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.scorer.prefix_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or self.loaded.spec

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = self.scorer.loglikelihood_tokens(pairs, desc="lm-eval loglikelihood", progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        texts = [req.args[0] for req in requests]
        totals = self.scorer.loglikelihood_rolling(texts, desc="lm-eval rolling", progress=not disable_tqdm)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from jaxcompress.eval.generation import generate_batched

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            room = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in idx]
            texts = generate_batched(self.loaded, prompts, max_new_tokens=max_new, temperature=temperature,
                                     top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0)),
                                     stop=until, batch_tokens=self.batch_tokens, desc="lm-eval generate",
                                     progress=not disable_tqdm)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None) or ""


# ------------------------------------------------------------------------ command line / install
def pth_path() -> str:
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def install_hook() -> str:
    """Writes the .pth that makes plain `lm_eval` know `--model jaxcompress`."""
    path = pth_path()
    line = ("import importlib.util as _u; _u.find_spec('jaxcompress') is not None and "
            "__import__('jaxcompress.eval.lm_eval_hook', fromlist=['install']).install()\n")
    with open(path, "w") as f:
        f.write(line)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install"]:
        print(f"wrote {install_hook()}: `lm_eval --model jaxcompress ...` now works in this environment")
        return 0
    if argv[:1] == ["uninstall"]:
        path = pth_path()
        if os.path.exists(path):
            os.remove(path)
        print(f"removed {path}")
        return 0
    if argv[:1] == ["run"]:
        argv = argv[1:]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
