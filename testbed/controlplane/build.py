"""Build the control plane (kube-apiserver, etcd, kube-scheduler, kube-controller-manager)
and the kubelet from the pinned Go modules in ``testbed/controlplane/go``, once.

The binaries are cached as ``<cache>/controlplane/<name>-<version>`` where the cache is
``$CHSCALE_CACHE_DIR``, else ``$XDG_CACHE_HOME/chscale``, else ``~/.cache/chscale``. The
versions are read from the ``go.mod`` files, so bumping a version there is the whole
upgrade. A binary is built only when missing, into a temporary name renamed into place
when complete (a killed build leaves nothing that looks finished), under an exclusive
lock (two processes asking at once build once). See ADR 0002. The kubelet, scheduler and
controller-manager build from the same ``k8s.io/kubernetes`` version and replace block as
kube-apiserver, each from its own module directory (their dependency sets differ); see
ADR 0014. Builds run under ``nice -n 19`` where ``nice`` exists: a shared CI machine
keeps its other work responsive while a cold build takes minutes.

``python -m testbed.controlplane.build`` (``make controlplane``) builds what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import attrs

GO_MODULES = Path(__file__).resolve().parent / "go"
TIMINGS_FILE = "build-times.json"
LOCK_FILE = ".build.lock"
# Where Go's own installer puts it; non-login shells often lack it on PATH.
GO_FALLBACK = Path("/usr/local/go/bin/go")
# Non-TTY progress: one line this often, so CI logs show the build is alive.
PROGRESS_EVERY_S = 20.0
TAIL_LINES = 40
# `go build -v` prints one import path per package it compiles; anything else
# (errors, "# pkg" headers) contains a space or a colon.
_PACKAGE_LINE = re.compile(r"^[A-Za-z0-9_.~\-/]+$")


class BuildError(RuntimeError):
    """The control-plane binaries could not be built."""


class GoNotFound(BuildError):
    pass


@attrs.frozen(slots=True)
class ControlPlaneBinaries:
    apiserver: Path
    etcd: Path
    scheduler: Path
    controller_manager: Path
    kubelet: Path


@attrs.frozen(slots=True)
class Component:
    """One binary: where its Go module is, what to build and how to name the result."""

    name: str
    module_dir: Path
    version: str
    package: str
    ldflags: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}"


def cache_dir() -> Path:
    """``<cache>/controlplane``; the environment decides ``<cache>`` (see module doc)."""
    if explicit := os.environ.get("CHSCALE_CACHE_DIR"):
        base = Path(explicit)
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        base = Path(xdg) / "chscale"
    else:
        base = Path.home() / ".cache" / "chscale"
    return base / "controlplane"


def required_version(go_mod: Path, module: str) -> str:
    """The version of ``module`` that ``go_mod`` requires (``require module vX.Y.Z``)."""
    text = go_mod.read_text()
    pattern = re.compile(
        rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v[0-9][^\s]*)\s*(?://.*)?$", re.MULTILINE
    )
    match = pattern.search(text)
    if match is None:
        raise BuildError(f"{go_mod}: no `require {module} <version>` line")
    return match.group(1)


def _kubernetes_ldflags(version: str) -> str:
    # Without these the binary reports v0.0.0, and clients (kubectl, the discovery
    # checks of controllers) see a nonsense server version; a kubelet would register
    # its Node with kubeletVersion v0.0.0.
    match = re.match(r"v(\d+)\.(\d+)\.", version)
    if match is None:
        raise BuildError(f"cannot read major.minor from Kubernetes version {version!r}")
    base = "k8s.io/component-base/version"
    return (
        f"-s -w -X {base}.gitVersion={version} "
        f"-X {base}.gitMajor={match.group(1)} -X {base}.gitMinor={match.group(2)}"
    )


# The Kubernetes binaries, in build order: each has a module directory of its own name
# under GO_MODULES requiring the same k8s.io/kubernetes version.
KUBERNETES_BINARIES = ("kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubelet")


def components(modules: Path = GO_MODULES) -> tuple[Component, ...]:
    """kube-apiserver, etcd, kube-scheduler, kube-controller-manager, kubelet, versions
    as pinned by their ``go.mod``."""
    built: dict[str, Component] = {}
    for name in KUBERNETES_BINARIES:
        module_dir = modules / name
        version = required_version(module_dir / "go.mod", "k8s.io/kubernetes")
        built[name] = Component(
            name, module_dir, version, f"k8s.io/kubernetes/cmd/{name}", _kubernetes_ldflags(version)
        )
    versions = {c.version for c in built.values()}
    if len(versions) != 1:
        # A kubelet newer than its apiserver is outside the version-skew policy.
        raise BuildError(
            f"{modules}: the Kubernetes modules pin different k8s.io/kubernetes versions: "
            + ", ".join(f"{c.name} {c.version}" for c in built.values())
        )
    etcd_dir = modules / "etcd"
    etcd = required_version(etcd_dir / "go.mod", "go.etcd.io/etcd/server/v3")
    return (
        built["kube-apiserver"],
        Component("etcd", etcd_dir, etcd, ".", "-s -w"),
        built["kube-scheduler"],
        built["kube-controller-manager"],
        built["kubelet"],
    )


def helm_component(modules: Path = GO_MODULES) -> Component:
    """The helm CLI, for the chart check only (not a control-plane binary, but pinned,
    built and cached the same way; ADR 0012)."""
    helm_dir = modules / "helm"
    version = required_version(helm_dir / "go.mod", "helm.sh/helm/v3")
    return Component(
        "helm",
        helm_dir,
        version,
        "helm.sh/helm/v3/cmd/helm",
        # Without it `helm version` says v3.x-dev, and charts' kubeVersion checks misread it.
        f"-s -w -X helm.sh/helm/v3/internal/version.version={version}",
    )


def find_go() -> str:
    found = shutil.which("go")
    if found:
        return found
    if GO_FALLBACK.is_file() and os.access(GO_FALLBACK, os.X_OK):
        return str(GO_FALLBACK)
    apiserver, etcd, *_ = components()
    raise GoNotFound(
        "the Go toolchain (`go`) is not on PATH (nor at "
        f"{GO_FALLBACK}). chscale builds kube-apiserver {apiserver.version} and etcd "
        f"{etcd.version} from {GO_MODULES} with Go >= 1.25 (the go.mod `go` line); install "
        "Go from https://go.dev/dl/ and put it on PATH, or place prebuilt binaries in "
        f"{cache_dir()} named " + ", ".join(c.filename for c in components()) + "."
    )


def paths(directory: Path | None = None) -> ControlPlaneBinaries:
    """Where the binaries are (or will be), without building anything."""
    directory = directory or cache_dir()
    return ControlPlaneBinaries(*(directory / c.filename for c in components()))


def _ready(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --- progress -------------------------------------------------------------------------


class _Progress:
    """One updating line on a terminal, a line every PROGRESS_EVERY_S otherwise."""

    def __init__(self, name: str, out: IO[str] | None) -> None:
        self.name, self.out = name, out
        self.tty = bool(out is not None and out.isatty())
        self.started = time.monotonic()
        self.packages = 0
        self._last_line = self.started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, *, force: bool = False) -> None:
        if self.out is None:
            return
        text = f"building {self.name}: {self.elapsed():.0f}s, {self.packages} packages compiled"
        if self.tty:
            self.out.write(f"\r{text}\x1b[K")
            self.out.flush()
        elif force or time.monotonic() - self._last_line >= PROGRESS_EVERY_S:
            self._last_line = time.monotonic()
            self.out.write(text + "\n")
            self.out.flush()

    def finish(self, ok: bool) -> None:
        if self.out is None:
            return
        verdict = "built" if ok else "FAILED"
        text = f"{verdict} {self.name} in {self.elapsed():.1f}s ({self.packages} packages compiled)"
        self.out.write((f"\r{text}\x1b[K\n") if self.tty else text + "\n")
        self.out.flush()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _build_one(go: str, component: Component, dest: Path, out: IO[str] | None) -> tuple[float, int]:
    """Build ``component`` to ``dest`` atomically; return (seconds, packages compiled)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    nice = shutil.which("nice")
    argv = [nice, "-n", "19"] if nice else []
    argv += [go, "build", "-v", "-trimpath", "-ldflags", component.ldflags, "-o", str(tmp)]
    argv.append(component.package)
    progress = _Progress(component.filename, out)
    progress.update(force=True)
    tail: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(
        argv,
        cwd=component.module_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                progress.update()
                continue
            if line is None:
                break
            if _PACKAGE_LINE.match(line):
                progress.packages += 1
            tail = [*tail[-(TAIL_LINES - 1) :], line]
            progress.update()
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        tmp.unlink(missing_ok=True)
        progress.finish(ok=False)
        raise
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        progress.finish(ok=False)
        shown = "\n".join(tail) or "(no output)"
        raise BuildError(
            f"`go build` of {component.filename} in {component.module_dir} exited with "
            f"{code}; last output:\n{shown}"
        )
    os.replace(tmp, dest)
    progress.finish(ok=True)
    return progress.elapsed(), progress.packages


# --- locking and bookkeeping ----------------------------------------------------------


@contextlib.contextmanager
def _exclusive(directory: Path, out: IO[str] | None) -> Iterator[None]:
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if out is not None:
                out.write(f"waiting for the control-plane build held by pid {holder}\n")
                out.flush()
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _go_version(go: str) -> str:
    try:
        done = subprocess.run([go, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def read_timings(directory: Path | None = None) -> dict[str, dict[str, object]]:
    """The build record: per binary, seconds, packages compiled, when and with which Go."""
    path = (directory or cache_dir()) / TIMINGS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(directory: Path, entries: dict[str, dict[str, object]]) -> None:
    data = {**read_timings(directory), **entries}
    tmp = directory / f".{TIMINGS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / TIMINGS_FILE)


# --- the entry points -----------------------------------------------------------------


def ensure_binaries(
    directory: Path | None = None, *, out: IO[str] | None = sys.stdout
) -> ControlPlaneBinaries:
    """The binaries, building whichever is missing. Prints progress to ``out`` (None:
    silent) and, when it built anything, ``controlplane_cold_build_s=<seconds>``."""
    directory = directory or cache_dir()
    wanted = paths(directory)
    if all(_ready(path) for path in attrs.astuple(wanted)):
        return wanted
    directory.mkdir(parents=True, exist_ok=True)
    go = find_go()
    with _exclusive(directory, out):
        # Another process may have built them while this one waited for the lock.
        todo = [
            (c, directory / c.filename) for c in components() if not _ready(directory / c.filename)
        ]
        if not todo:
            return wanted
        go_version = _go_version(go)
        total, packages, entries = 0.0, 0, {}
        for component, dest in todo:
            seconds, compiled = _build_one(go, component, dest, out)
            total += seconds
            packages += compiled
            entries[component.filename] = {
                "seconds": round(seconds, 1),
                "packages_compiled": compiled,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "go": go_version,
            }
        _record(directory, entries)
    if out is not None:
        out.write(f"controlplane_cold_build_s={total:.1f}\n")
        # -v lists only packages compiled, not those found in Go's build cache.
        cached = " (all from Go's build cache: a relink, not a cold build)" if not packages else ""
        out.write(
            f"# {packages} packages compiled{cached}; a warm Go build cache "
            f"(GOCACHE) makes a rebuild much faster than a cold one\n"
        )
        out.flush()
    return wanted


def ensure_helm(directory: Path | None = None, *, out: IO[str] | None = sys.stdout) -> Path:
    """The helm binary, built if missing (same cache, lock and record as the control
    plane); prints ``helm_cold_build_s=<seconds>`` when it built it."""
    directory = directory or cache_dir()
    helm = helm_component()
    dest = directory / helm.filename
    if _ready(dest):
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    go = find_go()
    with _exclusive(directory, out):
        if _ready(dest):
            return dest
        seconds, compiled = _build_one(go, helm, dest, out)
        _record(
            directory,
            {
                helm.filename: {
                    "seconds": round(seconds, 1),
                    "packages_compiled": compiled,
                    "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "go": _go_version(go),
                }
            },
        )
    if out is not None:
        cached = " (all from Go's build cache: a relink, not a cold build)" if not compiled else ""
        out.write(f"helm_cold_build_s={seconds:.1f}\n# {compiled} packages compiled{cached}\n")
        out.flush()
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.controlplane.build",
        description=(
            "Build kube-apiserver, etcd, kube-scheduler, kube-controller-manager and the "
            "kubelet from testbed/controlplane/go (only if missing)."
        ),
    )
    parser.add_argument("--print-paths", action="store_true", help="print the binary paths")
    parser.add_argument(
        "--helm", action="store_true", help="also the helm CLI the chart check uses (ADR 0012)"
    )
    parser.add_argument(
        "--no-node-packages",
        action="store_true",
        help="skip fetching the real node's containerd, runc and CNI plugins",
    )
    args = parser.parse_args(argv)
    try:
        binaries = ensure_binaries()
        helm = ensure_helm() if args.helm else None
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_node_packages:
        # Imported here: testbed.node builds on this module.
        from testbed.node.packages import ensure_packages

        if shutil.which("apt-get") and shutil.which("dpkg"):
            try:
                ensure_packages()
            except BuildError as exc:
                # The control plane is built; only the real node is unavailable: the
                # stack and the tests fall back to simulated nodes, saying why.
                print(f"warning: no real node: {exc}", file=sys.stderr)
        else:
            # Not an error: the local stack then runs simulated nodes only.
            print("# no apt-get/dpkg here: the real node's packages are not fetched")
    if args.print_paths:
        for name, path in attrs.asdict(binaries).items():
            print(f"{name}={path}")
        if helm is not None:
            print(f"helm={helm}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
