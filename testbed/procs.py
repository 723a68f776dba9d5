"""Child processes that never outlive their parent.

Every process chscale starts (etcd, kube-apiserver, the stack's components) runs in its
own process group with ``PR_SET_PDEATHSIG``, so a crashed or killed parent takes its
children with it, and is stopped with SIGTERM, then SIGKILL after a grace period, group
and all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 30


def die_with_parent(parent: int) -> Callable[[], None]:
    # libc is loaded here, in the parent: loading a library between fork and exec can
    # deadlock on a lock another thread held at fork time.
    libc: Any = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def preexec() -> None:
        # PDEATHSIG fires when the *thread* that forked exits: start children from a
        # thread that lives as long as they should (the main thread, usually).
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Child:
    """A child in its own process group, output appended to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self) -> str:
        return (
            f"{self.name} exited with code {self.proc.returncode}; "
            f"last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("process did not stop in time; killing it", extra={"child": self.name})
        # The group too: whatever the process started must not outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL without a chance to clean up (fault injection)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)


def processes_mentioning(fragment: str) -> list[int]:
    """The live processes (this one aside) whose command line contains ``fragment``."""
    me = os.getpid()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def end_processes_mentioning(fragment: str, grace: float = 5.0) -> int:
    """End (SIGTERM, then SIGKILL after ``grace``) every process whose command line
    contains ``fragment``; returns how many there were. For processes started detached
    on purpose (a VMM outlives its kubelet, as a container outlives a restarted real
    kubelet) whose starter is gone: nothing else would ever stop them."""
    mine = processes_mentioning(fragment)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in mine):
            time.sleep(0.05)
    return len(mine)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie is dead, only not yet reaped by its parent.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
