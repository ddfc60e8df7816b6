"""Where jaxcompress keeps what it can rebuild (evaluation results, converted tokenizers):
`$JAXCOMPRESS_CACHE`, else `~/.cache/jaxcompress`. Deleting it only costs time."""

from __future__ import annotations

import os

CACHE_ENV = "JAXCOMPRESS_CACHE"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/jaxcompress")
