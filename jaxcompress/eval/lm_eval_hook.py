"""Registers the jaxcompress model with lm-evaluation-harness when (and only when) lm-eval loads
its model list. Installed by `python -m jaxcompress.eval.lm_eval_adapter install` as a .pth
line, so it runs at interpreter start: it must stay tiny and import nothing heavy.

lm-eval imports `lm_eval.models` the first time it looks a model up; right after that module
has run, this hook imports `jaxcompress.eval.lm_eval_adapter`, whose `@register_model`
adds "jaxcompress" next to lm-eval's own models.
"""

import importlib.abc
import importlib.util
import sys

TRIGGER = "lm_eval.models"


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import jaxcompress.eval.lm_eval_adapter  # noqa: F401  (registers the model)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TRIGGER not in sys.modules and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
