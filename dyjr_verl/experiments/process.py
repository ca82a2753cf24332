"""Running one child process of an experiment: the machine-wide e2e lock, a deadline on every wait,
the child's whole process group killed on overrun, Ray's leftovers stopped, a timestamped log."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_FIRST_STEP = re.compile(r"(?:^|\s)step:1 - ")


class LockTimeout(RuntimeError):
    pass


@contextlib.contextmanager
def e2e_lock(path: Path, deadline_s: float, poll_s: float = 5.0,
             on_wait: Callable[[], None] | None = None) -> Iterator[float]:
    """Hold ``path`` with flock(2), the same lock as ``flock /tmp/dyjr_e2e.lock CMD`` in other
    sessions; yields the seconds spent waiting (``on_wait`` is called once if it is busy). Raises
    :class:`LockTimeout` past the deadline."""
    t0 = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                if time.monotonic() - t0 > deadline_s:
                    raise LockTimeout(f"{path} still held by another process after {deadline_s:.0f}s")
                time.sleep(poll_s)
        yield time.monotonic() - t0
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class ProcResult:
    returncode: int  # -9 when killed at the deadline
    wall_s: float
    first_step_s: float | None  # seconds from launch to the first "step:1 - " line
    timed_out: bool


def _kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log_path: Path, *, cwd: Path, env: dict[str, str], deadline_s: float) -> ProcResult:
    """Run ``cmd`` in its own process group, stdout+stderr into ``log_path``; kill the group past
    ``deadline_s`` (or when this process is interrupted)."""
    t0 = time.monotonic()
    first_step: list[float] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not first_step and _FIRST_STEP.search(line):
                    first_step.append(time.monotonic() - t0)
                log.write(line)
            log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # Ctrl-C / SIGTERM of the launcher: take the children down with it
            _kill_group(proc)
            raise
        reader.join(timeout=30)
    return ProcResult(-9 if timed_out else proc.returncode, time.monotonic() - t0,
                      first_step[0] if first_step else None, timed_out)


def ray_stop(deadline_s: float = 120.0) -> None:
    """Stop a local Ray cluster a killed (or finished) trainer left behind. Only called while this
    process holds the e2e lock, i.e. no other session's trainer is running."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], check=False, capture_output=True,
                       timeout=deadline_s)
