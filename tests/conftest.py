import atexit
import os
import shutil
import tempfile

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the session, in a fresh folder removed at the end: programs that
# lower to the same HLO under another jit key (a new jax.jit of the same function, a static option
# that does not change the kernel, e.g. Cw2Config(keys_zero=True) on a small grid) load the
# executable the first compile wrote instead of compiling again (the Pallas interpret-mode
# kernels take 10-20 s each to compile on the CPU). Nothing outlives the session, so no run reads
# another's executables.
# Under pytest-xdist (the README's `-n 2`) this runs first in the controller, before it starts the
# workers: they inherit the variables, skip this block and share the one folder, and only the
# controller removes it, at its exit, after the workers have ended. JAX takes a file lock around
# each read and write of an entry only when the cache has a size limit, so one is set, far above
# what a session writes: no worker reads an executable another is still writing, and no two write
# one entry at once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcompress-tests-xla-")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**40))
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# jaxcompress's own cache (jaxcompress.cache: evaluation results, GGUF tokenizers), the same way:
# one folder for the session, so SmolLM2's tokenizer is built from the GGUF once (about 15 s) and
# the other loads read it, and no test reads or writes the user's ~/.cache.
if "JAXCOMPRESS_CACHE" not in os.environ:
    os.environ["JAXCOMPRESS_CACHE"] = tempfile.mkdtemp(prefix="jaxcompress-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXCOMPRESS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real SmolLM2 model (seconds to a minute)")
    config.addinivalue_line("markers", "gpu: needs a GPU; run by scripts on the device machine")
