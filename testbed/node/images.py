"""The real node's images, built locally as OCI archives (no registry is reachable).

- ``pause``: the sandbox image, a tiny static C program that sleeps until a signal ends
  it (what the upstream pause image does), built with the C compiler here.
- ``vm-pod``: the image of a VM pod's container, which runs the Cloud Hypervisor
  simulator (``python -m testbed.chsim.main --sim-touch-memory``: the guest's memory
  really held, see ``testbed.chsim.ballast``), what ``chscale-ch-sim`` runs: the Python
  running this code (interpreter, standard library, shared libraries, at their paths on
  this machine), attrs, and the repository's simulator code, copied in. Self-contained,
  since the pod the controller builds mounts only its ``vmm`` emptyDir; a test bench's
  image, not a product one (ADR 0014).

Archives are cached under ``<cache>/node/images`` with names carrying their content
digest, so a changed recipe builds anew; ``ctr images import`` takes them as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import attrs

from testbed.controlplane.build import BuildError
from testbed.node.packages import node_cache

PAUSE_IMAGE = "chscale.local/pause:3.10"
VM_POD_IMAGE = "chscale.local/vm-pod:1"
# What the VM pod's container runs (the pod adds --api-socket). The guest's memory is
# really held, so the pod's cgroup sees what a real VMM's would (issue 16).
VM_POD_COMMAND = ("-m", "testbed.chsim.main", "--sim-touch-memory")

PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void done(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, done);
    signal(SIGTERM, done);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""
# waitpid's prototype lives in sys/wait.h; kept in the source so the file is whole.
PAUSE_C = "#include <sys/wait.h>\n" + PAUSE_C

VM_POD_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
VM_POD_DIRS = ("usr", "usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "tmp", "etc", "proc",
               "sys", "dev", "var", "var/run", "run", "opt", "opt/chscale")  # fmt: skip
# Inside the image: the repository's simulator code and attrs, importable from here.
APP_DIR = "opt/chscale"
# The VMM opens its kernel at boot, the simulator too: the image carries an empty one at
# this path, which the local stack gives the daemons of real nodes as their default kernel.
VM_POD_KERNEL = "/opt/chscale/vmlinux"
# The simulator and what it imports, relative to the repository root.
REPO_CODE = ("sim", "testbed/chsim", "apps/common", "core")
REPO_INITS = ("testbed/__init__.py", "apps/__init__.py")
STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
               "lib2to3", "config-3.11-x86_64-linux-gnu", "pydoc_data", "unittest"}  # fmt: skip
REPO = Path(__file__).resolve().parents[2]
STALE_IMAGE_S = 3600.0


@attrs.frozen(slots=True)
class Image:
    ref: str
    archive: Path


def _tar_layer(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def oci_archive(ref: str, layer: bytes, config: dict[str, object]) -> bytes:
    """One-layer OCI image layout as a tar, the index entry named ``ref``."""
    layer_digest, _ = _blob(layer)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_bytes = _blob(json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_digest, manifest_bytes = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, data in (
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index).encode()),
        *(
            (f"blobs/sha256/{digest.split(':', 1)[1]}", data)
            for digest, data in (
                (layer_digest, layer),
                (config_digest, config_bytes),
                (manifest_digest, manifest_bytes),
            )
        ),
    ):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        files.append((info, data))
    return _tar_layer(files)


def _compile_pause(workdir: Path) -> bytes:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler (cc/gcc) on PATH: the pause image is built from C")
    source, binary = workdir / "pause.c", workdir / "pause"
    source.write_text(PAUSE_C)
    done = subprocess.run(
        [compiler, "-static", "-Os", "-s", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise BuildError(f"compiling the pause program failed:\n{done.stderr[-2000:]}")
    return binary.read_bytes()


def pause_image(directory: Path | None = None) -> Image:
    directory = directory or node_cache() / "images"
    directory.mkdir(parents=True, exist_ok=True)
    recipe = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    cached = directory / f"pause-src-{recipe}.tar"
    if cached.is_file():
        return Image(PAUSE_IMAGE, cached)
    with tempfile.TemporaryDirectory() as tmp:
        binary = _compile_pause(Path(tmp))
    info = tarfile.TarInfo("pause")
    info.size, info.mode = len(binary), 0o755
    layer = _tar_layer([(info, binary)])
    archive = oci_archive(PAUSE_IMAGE, layer, {"Entrypoint": ["/pause"]})
    tmp_path = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    tmp_path.write_bytes(archive)
    os.replace(tmp_path, cached)
    return Image(PAUSE_IMAGE, cached)


def _shared_libraries(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for binary in binaries:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
        for line in done.stdout.splitlines():
            parts = line.split()
            for part in parts:
                if part.startswith("/") and Path(part).exists():
                    libs.add(Path(part))
    return libs


def _vm_pod_files() -> list[tuple[Path, str]]:
    """(file on this machine, path inside the image) for the simulator's container: this
    Python (interpreter, standard library, shared libraries at their own paths, so it
    finds its prefix as here), attrs, and the repository's simulator code."""
    interpreter = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files: list[tuple[Path, str]] = [(interpreter, str(interpreter).lstrip("/"))]
    extensions: list[Path] = []
    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in STDLIB_SKIP or "__pycache__" in rel.parts or not path.is_file():
            continue
        files.append((path, str(path).lstrip("/")))
        if path.suffix == ".so":
            extensions.append(path)
    for lib in sorted(_shared_libraries([interpreter, *extensions])):
        files.append((lib, str(lib).lstrip("/")))
        real = Path(os.path.realpath(lib))
        if real != lib:
            files.append((real, str(real).lstrip("/")))
    import attr
    import attrs

    for module in (attr, attrs):
        package = Path(module.__file__ or "").parent
        for path in sorted(package.rglob("*.py")):
            files.append((path, f"{APP_DIR}/{package.name}/{path.relative_to(package)}"))
    for top in REPO_CODE:
        for path in sorted((REPO / top).rglob("*.py")):
            files.append((path, f"{APP_DIR}/{path.relative_to(REPO)}"))
    files += [(REPO / init, f"{APP_DIR}/{init}") for init in REPO_INITS]
    return files


def vm_pod_image(directory: Path | None = None) -> Image:
    """The VM pod's image: the Cloud Hypervisor simulator with its Python, self-contained
    (the pod the controller builds mounts nothing but its ``vmm`` emptyDir)."""
    directory = directory or node_cache() / "images"
    directory.mkdir(parents=True, exist_ok=True)
    files = _vm_pod_files()
    recipe = hashlib.sha256("\0".join((VM_POD_KERNEL, *VM_POD_COMMAND)).encode())
    for src, dest in files:
        stat = src.stat()
        recipe.update(f"{dest}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cached = directory / f"vm-pod-src-{recipe.hexdigest()[:12]}.tar"
    if cached.is_file():
        return Image(VM_POD_IMAGE, cached)
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    dirs: set[str] = set(VM_POD_DIRS)
    for _, dest in files:
        parts = Path(dest).parts[:-1]
        dirs |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    for name in sorted(dirs - set(VM_POD_LINKS)):
        if any(name == k or name.startswith(k + "/") for k in VM_POD_LINKS):
            continue  # under a top-level symlink: its usr/ twin holds it
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
        entries.append((info, None))
    for name, target in VM_POD_LINKS.items():
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        entries.append((info, None))
    seen: set[str] = set()
    for src, dest in files:
        # /lib/x86_64-linux-gnu/... lives in usr/ behind the merged-/usr symlinks.
        top = Path(dest).parts[0]
        if top in VM_POD_LINKS:
            dest = f"{VM_POD_LINKS[top]}/{Path(*Path(dest).parts[1:])}"
        if dest in seen:
            continue
        seen.add(dest)
        data = src.read_bytes()
        info = tarfile.TarInfo(dest)
        info.size, info.mode = len(data), src.stat().st_mode & 0o777
        entries.append((info, data))
    kernel = tarfile.TarInfo(VM_POD_KERNEL.lstrip("/"))
    kernel.size, kernel.mode = 0, 0o644
    entries.append((kernel, b""))
    interpreter = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    config = {
        "Entrypoint": [str(interpreter), *VM_POD_COMMAND],
        "Env": [f"PYTHONPATH=/{APP_DIR}", "PYTHONDONTWRITEBYTECODE=1", "PATH=/usr/bin:/bin"],
    }
    archive = oci_archive(VM_POD_IMAGE, _tar_layer(entries), config)
    tmp_path = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    tmp_path.write_bytes(archive)
    os.replace(tmp_path, cached)
    # An edited simulator makes older archives stale; one left by another checkout may
    # be about to be imported, so only those an hour old go.
    for old in directory.glob("vm-pod-src-*.tar"):
        with contextlib.suppress(OSError):
            if old != cached and time.time() - old.stat().st_mtime > STALE_IMAGE_S:
                old.unlink()
    return Image(VM_POD_IMAGE, cached)


def ensure_images(directory: Path | None = None) -> tuple[Image, Image]:
    return pause_image(directory), vm_pod_image(directory)
