"""Where jaxcompress keeps what it can rebuild (evaluation results, converted tokenizers):
`$JAXCOMPRESS_CACHE`, else `~/.cache/jaxcompress`. Deleting it only costs time. Entries derived
from a file or folder are keyed by its fingerprint (paths, sizes, modification times)."""

from __future__ import annotations

import hashlib
import os

CACHE_ENV = "JAXCOMPRESS_CACHE"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/jaxcompress")


def file_fingerprint(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def folder_fingerprint(folder: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            p = os.path.join(root, f)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
