"""The sandbox for generated code: hostile programs end as failed samples within the timeout,
and the test process is unharmed. Runs in both isolation modes this machine can offer."""

import os
import socket
import subprocess
import threading
import time

import pytest

from jaxcompress.eval import sandbox
from jaxcompress.eval.sandbox import Limits, run_program

LIMITS = Limits(timeout_s=4.0, cpu_s=2, memory_mb=512, max_procs=8)
MODES = ["namespaces", "audit-hook"] if sandbox.isolation() == "namespaces" else ["audit-hook"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: request.param)
    return request.param


def sandbox_processes() -> list[int]:
    """Processes still owned by a uid this process gives its sandboxed programs (a parallel test
    worker's sandboxes, running at the same time, have uids of their own)."""
    uids = sandbox.caller_uids()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                continue
            if uid in uids:
                found.append(int(pid))
    return found


def assert_failed_in_time(outcome):
    assert not outcome.passed, outcome
    assert outcome.seconds < LIMITS.timeout_s + 2.0, outcome


def test_a_correct_program_passes(mode):
    out = run_program("import math, hashlib\nassert math.gcd(12, 18) == 6\nprint(hashlib.md5(b'a').hexdigest())",
                      LIMITS)
    assert out.passed and out.stdout.strip() == "0cc175b9c0f1b6a831c399e269772661", out
    failing = run_program("def f(x):\n    return x + 1\nassert f(1) == 3\n", LIMITS)
    assert failing.status == "failed" and "AssertionError" in failing.stderr


def test_infinite_loop_is_stopped(mode):
    out = run_program("while True:\n    pass\n", LIMITS)
    assert_failed_in_time(out)
    assert out.seconds >= LIMITS.cpu_s * 0.9  # it really ran until a limit stopped it


def test_sleeping_forever_hits_the_wall_clock(mode):
    out = run_program("import time\ntime.sleep(1000)\n", LIMITS)
    assert out.status == "timeout" and out.seconds < LIMITS.timeout_s + 2.0


def test_memory_bomb_fails(mode):
    out = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", LIMITS)
    assert_failed_in_time(out)
    assert "MemoryError" in out.stderr


def test_fork_bomb_fails_and_leaves_nothing(mode):
    out = run_program("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert_failed_in_time(out)
    time.sleep(0.5)
    assert sandbox_processes() == []
    # The test process can still make processes and threads.
    assert subprocess.run(["true"]).returncode == 0
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def test_socket_connect_fails(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        program = ("import socket\ns = socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
                   "s.sendall(b'leak')\n") % port
        out = run_program(program, LIMITS)
        assert_failed_in_time(out)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
        # The low-level module is refused too.
        out = run_program("import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', %d))\n" % port, LIMITS)
        assert_failed_in_time(out)
    finally:
        server.close()


def test_writing_outside_the_workdir_fails(mode, tmp_path):
    target = tmp_path / "owned.txt"
    secret = tmp_path / "secret.txt"
    secret.write_text("caller data")
    for program in (f"open({str(target)!r}, 'w').write('x')\n",
                    f"import os\nos.system('touch {target}')\nassert os.path.exists({str(target)!r})\n",
                    f"import os\nos.remove({str(secret)!r})\n"):
        out = run_program(program, LIMITS)
        assert_failed_in_time(out)
    assert not target.exists() and secret.read_text() == "caller data"
    # Writing inside the working directory (HOME) is fine.
    assert run_program("import os\nopen(os.path.join(os.environ['HOME'], 'ok.txt'), 'w').write('x')\n",
                       LIMITS).passed


def test_callers_files_are_hidden():
    if sandbox.isolation() != "namespaces":
        pytest.skip("only the namespaces mode hides the caller's files")
    here = os.path.abspath(__file__)
    out = run_program(f"print(open({here!r}).read()[:10])\n", LIMITS)
    assert not out.passed and "No such file" in out.stderr


def test_humaneval_program_layout():
    problem = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
               "entry_point": "add"}
    assert run_program(sandbox.humaneval_program(problem, "    return a + b\n"), LIMITS).passed
    assert not run_program(sandbox.humaneval_program(problem, "    return a - b\n"), LIMITS).passed
