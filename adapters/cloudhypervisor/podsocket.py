"""Opening a pod's VMM socket so that it can only lead to that pod's own VMM (ADR 0011).

A tenant who can write its pod's ``vmm`` emptyDir (``kubectl exec``) can put anything
at ``ch.sock``: a symlink to another pod's socket, a directory symlink higher up, a FIFO.
So the path is never handed to ``connect`` as a string:

- every directory from the pods root down to the pod's ``vmm`` directory is opened with
  ``O_NOFOLLOW`` relative to the one before (the pods root itself is the operator's and is
  followed), so a symlink in any component below the root is refused;
- ``ch.sock`` is opened ``O_PATH | O_NOFOLLOW`` in that directory and ``fstat``-ed: a
  symlink or anything that is not a socket is refused, and so is a socket whose owner is
  not the expected one (``owner_uid``) or, by default, not the process listening on it;
- the connection goes through ``/proc/self/fd/<that fd>``, so what was checked is what is
  connected to (no window between the check and the ``connect``), and the path stays far
  below the 108 bytes ``sun_path`` holds whatever the pods root;
- the listening process is identified with ``SO_PEERCRED``: its cgroup must name the pod
  (``pod<uid>``, as the kubelet's cgroupfs and systemd drivers both do) or its environment
  must hold :data:`POD_UID_ENV` = the pod uid (the pod builder sets it from the downward
  API). Anything else, including an identity that cannot be read, is a mismatch.

Refusals raise :class:`VmmSocketRefused` / :class:`VmmIdentityMismatch` (both
:class:`VmmUntrusted`); a socket that does not exist yet is :class:`VmmUnreachable`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from adapters.cloudhypervisor.errors import (
    VmmIdentityMismatch,
    VmmSocketRefused,
    VmmUnreachable,
)
from core.podlayout import POD_UID_ENV, VMM_SOCKET_NAME, vmm_socket_dir

__all__ = ["POD_UID_ENV", "PodSocket", "connect_path", "peer_pid"]

# /proc/<pid>/environ of a VMM is small; a bigger one is not worth reading to the end.
_MAX_PROC_READ = 1 << 20
_CONNECT = "connect"


def connect_path(path: str, timeout: float) -> socket.socket:
    """A plain connection to ``path`` (the test bench and the CLI, which are the socket's
    owner): no containment, no identity check."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_pid(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that listens on the other end of ``sock``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read(_MAX_PROC_READ)
    except OSError:  # gone, or not ours to read (environ needs ptrace rights)
        return None


def _cgroup_names_pod(cgroup: bytes, pod_uid: str) -> bool:
    # cgroupfs: .../kubepods/burstable/pod<uid>/<container>; systemd:
    # .../kubepods-burstable-pod<uid with _ for ->.slice/...
    wanted = (f"pod{pod_uid}".encode(), f"pod{pod_uid.replace('-', '_')}".encode())
    for line in cgroup.splitlines():
        path = line.split(b":", 2)[-1]
        for part in path.split(b"/"):
            for token in part.removesuffix(b".slice").split(b"-"):
                if token in wanted:
                    return True
            if part in wanted:
                return True
    return False


def _environ_names_pod(environ: bytes, pod_uid: str) -> bool:
    return f"{POD_UID_ENV}={pod_uid}".encode() in environ.split(b"\0")


class PodSocket:
    """Connector for the VMM socket of pod ``pod_uid`` under ``pods_root``."""

    def __init__(
        self,
        pods_root: str,
        pod_uid: str,
        *,
        owner_uid: int | None = None,
        check_identity: bool = True,
    ) -> None:
        self.pods_root = pods_root.rstrip("/") or "/"
        self.pod_uid = pod_uid
        self.owner_uid = owner_uid
        self.check_identity = check_identity
        directory = vmm_socket_dir(pods_root, pod_uid)  # refuses a uid like "../x"
        self.path = f"{directory}/{VMM_SOCKET_NAME}"
        prefix = pods_root.rstrip("/") + "/"
        self._components = tuple(directory[len(prefix) :].split("/"))

    def __call__(self, timeout: float) -> socket.socket:
        fds: list[int] = []
        try:
            fd = self._open_dir(fds)
            sock_fd = self._open_socket(fd, fds)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                try:
                    sock.connect(f"/proc/self/fd/{sock_fd}")
                except OSError as exc:
                    raise VmmUnreachable(self.path, _CONNECT, f"cannot connect: {exc}") from exc
                self._check_peer(sock, sock_fd)
            except BaseException:
                sock.close()
                raise
            return sock
        finally:
            for opened in reversed(fds):
                with contextlib.suppress(OSError):
                    os.close(opened)

    def _open_dir(self, fds: list[int]) -> int:
        try:
            fd = os.open(self.pods_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise VmmUnreachable(self.path, _CONNECT, f"pods root: {exc}") from exc
        fds.append(fd)
        walked = self.pods_root
        for part in self._components:
            walked = f"{walked}/{part}"
            try:
                fd = os.open(
                    part,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=fd,
                )
            except FileNotFoundError as exc:
                raise VmmUnreachable(self.path, _CONNECT, f"{walked} does not exist") from exc
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise VmmSocketRefused(
                        self.path, _CONNECT, f"{walked} is a symlink or not a directory"
                    ) from exc
                raise VmmUnreachable(self.path, _CONNECT, f"{walked}: {exc}") from exc
            fds.append(fd)
        return fd

    def _open_socket(self, dir_fd: int, fds: list[int]) -> int:
        try:
            fd = os.open(VMM_SOCKET_NAME, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            raise VmmUnreachable(self.path, _CONNECT, "no socket (yet)") from exc
        except OSError as exc:
            raise VmmUnreachable(self.path, _CONNECT, str(exc)) from exc
        fds.append(fd)
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise VmmSocketRefused(self.path, _CONNECT, "is a symlink")
        if not stat.S_ISSOCK(st.st_mode):
            raise VmmSocketRefused(
                self.path, _CONNECT, f"is not a socket (mode {stat.filemode(st.st_mode)})"
            )
        if self.owner_uid is not None and st.st_uid != self.owner_uid:
            raise VmmSocketRefused(
                self.path, _CONNECT, f"is owned by uid {st.st_uid}, expected {self.owner_uid}"
            )
        return fd

    def _check_peer(self, sock: socket.socket, sock_fd: int) -> None:
        if not self.check_identity:
            return
        pid, uid, _gid = peer_pid(sock)
        if pid <= 0:
            raise VmmIdentityMismatch(
                self.path,
                _CONNECT,
                "the listening process is not visible from this pid "
                "namespace (the daemon needs hostPID)",
            )
        owner = os.fstat(sock_fd).st_uid
        if self.owner_uid is None and owner != uid:
            raise VmmSocketRefused(
                self.path,
                _CONNECT,
                f"is owned by uid {owner} but served by a process of uid {uid}",
            )
        cgroup = _read_proc(pid, "cgroup")
        if cgroup is not None and _cgroup_names_pod(cgroup, self.pod_uid):
            return
        environ = _read_proc(pid, "environ")
        if environ is not None and _environ_names_pod(environ, self.pod_uid):
            return
        raise VmmIdentityMismatch(
            self.path,
            _CONNECT,
            f"the process behind it (pid {pid}) is not pod {self.pod_uid}'s VMM: neither its "
            f"cgroup nor {POD_UID_ENV} names the pod",
        )
