"""containerd, runc and the CNI plugins from Debian's packages, pinned, cached, unpacked.

The .debs are fetched with ``apt-get download`` through a private apt configuration
(its own sources list and package lists under the cache, nothing of the system's apt
state read or written), checked against the pinned SHA-256, kept under
``<cache>/node/debs`` and unpacked with ``dpkg -x`` into ``<cache>/node/root-<pins>``:
nothing is installed into the system. The versions are the ones REALITY.md section 2
ran: containerd 2.x from sid (the kubelet v1.35 needs containerd >= 2.0; bookworm has
1.6), runc and the plugins from bookworm (sid's runc needs glibc 2.38, this machine has
2.36). A pinned version that leaves the archive is an error naming it, never a silent
switch to another version. See ADR 0014.

``python -m testbed.node.packages`` fetches and unpacks what is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import attrs

from testbed.controlplane.build import BuildError, _exclusive, cache_dir

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SUITES = (
    (MIRROR, "bookworm"),
    (SECURITY, "bookworm-security"),
    (MIRROR, "sid"),
)
APT_TIMEOUT_S = 600.0


@attrs.frozen(slots=True)
class Deb:
    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        # apt-get download escapes the epoch colon; none of the pins has one.
        return f"{self.package}_{self.version}_amd64.deb"


PINS = (
    Deb(
        "containerd",
        "2.1.9+ds1-5",
        "2dda86ce7033fd612fc50e136679d8174ccad680eb29cd4611e0d2a1b84cf591",
    ),
    Deb(
        "runc",
        "1.1.5+ds1-1+deb12u1",
        "a00351f8c0318de0b424ecf5cd0fdb69880a89f3511cae4f6fff7de3e57881c5",
    ),
    Deb(
        "containernetworking-plugins",
        "1.1.1+ds1-3+b5",
        "4cac8143474d1249b19f7b0e80b8d0daaa6dfdaa8bd514bc468d38d4a108099f",
    ),
)


@attrs.frozen(slots=True)
class NodePackages:
    """Where the unpacked programs are."""

    root: Path

    @property
    def containerd(self) -> Path:
        return self.root / "usr" / "bin" / "containerd"

    @property
    def shim(self) -> Path:
        return self.root / "usr" / "bin" / "containerd-shim-runc-v2"

    @property
    def ctr(self) -> Path:
        return self.root / "usr" / "bin" / "ctr"

    @property
    def runc(self) -> Path:
        return self.root / "usr" / "sbin" / "runc"

    @property
    def cni_bin(self) -> Path:
        return self.root / "usr" / "lib" / "cni"

    @property
    def bin_dirs(self) -> tuple[Path, ...]:
        return (self.root / "usr" / "bin", self.root / "usr" / "sbin")

    def programs(self) -> tuple[Path, ...]:
        return (
            self.containerd,
            self.shim,
            self.ctr,
            self.runc,
            self.cni_bin / "bridge",
            self.cni_bin / "host-local",
            self.cni_bin / "loopback",
        )


def node_cache() -> Path:
    return cache_dir().parent / "node"


def _root_name(pins: tuple[Deb, ...]) -> str:
    digest = hashlib.sha256("\n".join(d.sha256 for d in pins).encode()).hexdigest()[:12]
    return f"root-{digest}"


def paths(directory: Path | None = None, pins: tuple[Deb, ...] = PINS) -> NodePackages:
    return NodePackages((directory or node_cache()) / _root_name(pins))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _apt_options(apt: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Dir::State::Status=/dev/null",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        # The downloads land in a root-owned cache; apt's sandbox user cannot write there.
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def _run(argv: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise BuildError(f"{what} exited with {done.returncode}:\n" + "\n".join(tail))


def _download(missing: list[Deb], debs: Path, apt: Path, out: IO[str] | None) -> None:
    if shutil.which("apt-get") is None:
        raise BuildError(
            "apt-get is not on PATH: the real node's containerd and runc come from Debian's "
            "packages; place " + ", ".join(d.filename for d in missing) + f" in {debs}"
        )
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "".join(f"deb [signed-by={KEYRING}] {url} {suite} main\n" for url, suite in SUITES)
    )
    options = _apt_options(apt)
    if out is not None:
        out.write("fetching Debian package lists (bookworm, sid) for the real node\n")
        out.flush()
    _run(["apt-get", *options, "update"], apt, "apt-get update")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        wanted = [f"{d.package}={d.version}" for d in missing]
        if out is not None:
            out.write(f"downloading {' '.join(wanted)}\n")
            out.flush()
        _run(["apt-get", *options, "download", *wanted], Path(tmp), "apt-get download")
        for deb in missing:
            got = Path(tmp) / deb.filename
            if not got.is_file():
                raise BuildError(f"apt-get download did not produce {deb.filename}")
            digest = _sha256(got)
            if digest != deb.sha256:
                raise BuildError(
                    f"{deb.filename}: SHA-256 {digest}, pinned {deb.sha256} (testbed/node/"
                    "packages.py PINS)"
                )
            os.replace(got, debs / deb.filename)


def ensure_packages(
    directory: Path | None = None, *, out: IO[str] | None = sys.stdout, pins: tuple[Deb, ...] = PINS
) -> NodePackages:
    """The unpacked packages, fetching and unpacking whatever is missing."""
    directory = directory or node_cache()
    wanted = paths(directory, pins)
    if all(p.exists() for p in wanted.programs()):
        return wanted
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory, out):
        if all(p.exists() for p in wanted.programs()):
            return wanted
        started = time.monotonic()
        debs = directory / "debs"
        debs.mkdir(exist_ok=True)
        missing = [
            d for d in pins
            if not (debs / d.filename).is_file() or _sha256(debs / d.filename) != d.sha256
        ]  # fmt: skip
        if missing:
            try:
                _download(missing, debs, directory / "apt", out)
            finally:
                # The package lists (~200 MB, sid's mostly) serve only this download.
                shutil.rmtree(directory / "apt", ignore_errors=True)
        if shutil.which("dpkg") is None:
            raise BuildError("dpkg is not on PATH: it unpacks the real node's .debs")
        tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=directory))
        try:
            for deb in pins:
                _run(["dpkg", "-x", str(debs / deb.filename), str(tmp)], directory, "dpkg -x")
            shutil.rmtree(wanted.root, ignore_errors=True)
            os.replace(tmp, wanted.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        absent = [str(p) for p in wanted.programs() if not p.exists()]
        if absent:
            raise BuildError("the unpacked packages lack " + ", ".join(absent))
        if out is not None:
            out.write(f"node_packages_s={time.monotonic() - started:.1f}\n")
            out.flush()
    return wanted


def main() -> int:
    try:
        found = ensure_packages()
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for program in found.programs():
        print(program)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
