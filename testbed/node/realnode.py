"""A real node: containerd + runc + the kubelet v1.35, on this machine, for one run.

Everything the node touches is the run's own, so concurrent runs do not collide (ADR
0014): a short run directory (``/tmp/chsn-<id>``: containerd's root, state and socket,
the kubelet's root directory, pod logs, CNI state; short because the VMM sockets under
``<kubelet root>/pods`` must fit a Unix socket path), a cgroup root ``/chscale-<id>``
in every cgroup hierarchy, a bridge ``chs<id>`` with a /24 no route uses yet, and ports
chosen free (the kubelet serves on 127.0.0.1 only). ``stop()`` undoes all of it: it ends
the kubelet, every container process and shim, and containerd, unmounts whatever is
still mounted under the run directory, removes the cgroups and the bridge, and deletes
the directory. ``leftovers()`` lists what would remain, for the teardown test.

Facts from REALITY.md section 2 this follows: cgroup v1 here (``failCgroupV1: false``),
``--node-ip`` may not be loopback, runc cannot lower ``oom_score_adj``
(``restrict_oom_score_adj``), no registry (images imported, pinned sandbox image), no
Ready without a CNI config (bridge + host-local).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import yaml  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters import pki as pki_
from testbed.controlplane.build import BuildError
from testbed.controlplane.launcher import STACK_LABEL, ControlPlane, _write_cert, _write_key
from testbed.node.images import ensure_images
from testbed.node.packages import NodePackages, ensure_packages
from testbed.node.packages import paths as package_paths
from testbed.procs import Child, alive

log = logging.getLogger(__name__)

RUN_PREFIX = "chsn-"
CGROUP_PREFIX = "chscale-"
BRIDGE_PREFIX = "chs"
CGROUP_FS = "/sys/fs/cgroup"
CONTAINERD_READY_S = 60.0
# Candidate pod subnets: 10.200.0.0/24 .. 10.254.255.0/24, one picked at random that no
# route on the machine covers (each run's bridge adds its connected route).
SUBNET_FIRST_OCTET = 10
SUBNET_SECOND = range(200, 255)
NAMESPACE = "k8s.io"  # containerd's namespace for CRI
OWNER_FILE = "owner"
# What a node's kubelet may be shown (``RealNode(cpus=...)``); cAdvisor reads every CPU
# directory, so this only keeps a typo from writing thousands of them.
MAX_NODE_CPUS = 256


class RealNodeError(RuntimeError):
    pass


@attrs.frozen(slots=True)
class Verdict:
    ok: bool
    reason: str


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) per line of /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            point = fields[4].replace("\\040", " ")
            found.append((point, rfields[0], rfields[2]))
    return found


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, named ones, the v2 unified one)."""
    return sorted(
        {Path(point) for point, fstype, _ in _mounts() if fstype in ("cgroup", "cgroup2")}
    )


def machine_allows(*, fetch: bool = False) -> Verdict:
    """Whether a real node can run here, and if not, why (for ``chscale up`` and the
    tests). ``fetch`` fetches the node's packages if they are not cached yet; without it
    they must be."""
    verdict = _machine_allows()
    if not verdict.ok:
        return verdict
    if fetch:
        try:
            ensure_packages(out=None)
        except BuildError as exc:
            return Verdict(False, f"containerd/runc packages unavailable: {exc}")
    elif not all(p.exists() for p in package_paths().programs()):
        return Verdict(False, "containerd/runc packages not cached (make controlplane)")
    return verdict


def _machine_allows() -> Verdict:
    if os.geteuid() != 0:
        return Verdict(False, "not root (containerd, runc and the kubelet need root)")
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return Verdict(False, f"cannot read /proc/filesystems: {exc}")
    if "overlay" not in filesystems.split():
        return Verdict(False, "no overlayfs in this kernel (containerd's snapshotter)")
    hierarchies = cgroup_hierarchies()
    if not hierarchies:
        return Verdict(False, "no cgroup hierarchy mounted")
    probe_name = f"{CGROUP_PREFIX}probe-{os.getpid()}"
    for hierarchy in hierarchies:
        probe = hierarchy / probe_name
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            return Verdict(False, f"cgroups not writable ({hierarchy}: {exc.strerror})")
    for tool in ("ip", "mount", "umount", "unshare"):
        if shutil.which(tool) is None:
            return Verdict(False, f"`{tool}` is not on PATH")
    if _node_ip() is None:
        return Verdict(False, "no non-loopback IPv4 address for the kubelet's --node-ip")
    if not (shutil.which("cc") or shutil.which("gcc")):
        return Verdict(False, "no C compiler for the pause image")
    return Verdict(True, "root, writable cgroups and overlayfs")


def _online_cpus() -> set[int]:
    """The ids in /sys/devices/system/cpu/online ("0-1,4"), as cAdvisor reads them."""
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    found: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def _node_ip() -> str | None:
    # The kubelet refuses a loopback --node-ip (REALITY.md section 2); the address is
    # only reported in the Node's status, nothing is served on it.
    try:
        done = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            address = parts[parts.index("inet") + 1].split("/")[0]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _used_networks() -> list[ipaddress.IPv4Network]:
    done = subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                          capture_output=True, text=True, timeout=10)  # fmt: skip
    nets = []
    for line in done.stdout.splitlines():
        head = line.split()[0] if line.split() else ""
        if head in ("local", "broadcast", "unreachable", "blackhole"):
            head = line.split()[1]
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(head if head != "default" else "0.0.0.0/32",
                                              strict=False))  # fmt: skip
    return nets


def _pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = [n for n in _used_networks() if n.prefixlen > 0]
    for _ in range(200):
        net = ipaddress.IPv4Network(
            f"{SUBNET_FIRST_OCTET}.{rng.choice(SUBNET_SECOND)}.{rng.randrange(256)}.0/24"
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise RealNodeError("no free /24 in 10.200.0.0-10.254.255.0 for the pod bridge")


class RealNode:
    """One real node registered as ``name`` on ``control_plane``; ``start()``/``stop()``."""

    def __init__(
        self,
        name: str,
        state_dir: Path,
        control_plane: ControlPlane,
        *,
        labels: dict[str, str] | None = None,
        run_id: str | None = None,
        cpus: int | None = None,
    ) -> None:
        if cpus is not None and not 1 <= cpus <= MAX_NODE_CPUS:
            raise RealNodeError(f"cpus must be 1..{MAX_NODE_CPUS}, got {cpus}")
        self.name = name
        self.cpus = cpus
        self.state_dir = state_dir
        self.control_plane = control_plane
        self.labels = dict(labels or {})
        self.run_id = run_id or os.urandom(4).hex()
        self.run_dir = Path(tempfile.gettempdir()) / f"{RUN_PREFIX}{self.run_id}"
        self.cgroup_root = f"/{CGROUP_PREFIX}{self.run_id}"
        self.bridge = f"{BRIDGE_PREFIX}{self.run_id}"[:15]
        self.children: dict[str, Child] = {}
        self.packages: NodePackages | None = None
        self.node_ip: str | None = None
        self.subnet: ipaddress.IPv4Network | None = None

    # --- where things are --------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.run_dir / "k"

    @property
    def pods_root(self) -> Path:
        """The VMM socket root the node daemon takes (``--vmm-socket-root``)."""
        return self.kubelet_root / "pods"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    # --- start -------------------------------------------------------------------------

    def start(self) -> None:
        verdict = machine_allows()
        if not verdict.ok:
            raise RealNodeError(f"a real node cannot run here: {verdict.reason}")
        self.packages = ensure_packages(out=None)
        binaries = self.control_plane.binaries
        if binaries is None:
            raise RealNodeError("the control plane has not been started")
        self.node_ip = _node_ip()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale_runs()
        self.run_dir.mkdir(mode=0o700)
        # Who owns the run: a run whose owner died (SIGKILL, a crash) is swept by the next.
        (self.run_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        try:
            self.subnet = _pick_subnet(random.Random(self.run_id))
            for hierarchy in cgroup_hierarchies():
                (hierarchy / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
            self._start_containerd()
            self._import_images()
            self._write_cni()
            self._start_kubelet(str(binaries.kubelet))
        except BaseException:
            self.stop()
            raise

    def _start_containerd(self) -> None:
        assert self.packages is not None
        pk = self.packages
        config = self.state_dir / "containerd.toml"
        run = self.run_dir
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        config.write_text(
            f"""version = 3
root = '{run / "c" / "root"}'
state = '{run / "c" / "state"}'
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.internal.v1.tracing']
[grpc]
  address = '{self.containerd_socket}'
[ttrpc]
  address = ''
[debug]
  address = ''
[metrics]
  address = ''
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'chscale.local/pause:3.10'
  [{runtime}]
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    enable_cdi = false
    [{runtime}.containerd]
      default_runtime_name = 'runc'
      [{runtime}.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [{runtime}.containerd.runtimes.runc.options]
          BinaryName = '{pk.runc}'
          SystemdCgroup = false
    [{runtime}.cni]
      bin_dirs = ['{pk.cni_bin}']
      conf_dir = '{self.state_dir / "cni"}'
  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
  [plugins.'io.containerd.internal.v1.opt']
    path = '{run / "opt"}'
"""
        )
        path = ":".join([*(str(d) for d in pk.bin_dirs), os.environ.get("PATH", "/usr/bin:/bin")])
        self.children["containerd"] = Child(
            "containerd",
            ["env", f"PATH={path}", str(pk.containerd), "--config", str(config)],
            self.logs / "containerd.log",
        )
        deadline = time.monotonic() + CONTAINERD_READY_S
        while time.monotonic() < deadline:
            child = self.children["containerd"]
            if not child.alive():
                raise RealNodeError(child.failure())
            if self.containerd_socket.exists() and self._ctr("version", check=False) == 0:
                return
            time.sleep(0.2)
        raise RealNodeError(f"containerd did not answer within {CONTAINERD_READY_S:.0f}s")

    def _ctr(self, *args: str, check: bool = True) -> int:
        assert self.packages is not None
        argv = [str(self.packages.ctr), "-a", str(self.containerd_socket), "-n", NAMESPACE, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RealNodeError(f"{' '.join(argv)}: {done.stderr.strip()[-1000:]}")
        return done.returncode

    def _import_images(self) -> None:
        for image in ensure_images():
            self._ctr("images", "import", "--platform", "linux/amd64", str(image.archive))

    def _write_cni(self) -> None:
        assert self.subnet is not None
        conf_dir = self.state_dir / "cni"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": f"chscale-{self.run_id}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    # No masquerading: pods talk to nothing beyond the bridge.
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet)}]],
                        "dataDir": str(self.run_dir / "ipam"),
                    },
                }
            ],
        }
        (conf_dir / "10-chscale.conflist").write_text(json.dumps(conflist, indent=2))

    def _credentials(self) -> tuple[Path, Path, Path]:
        """The kubelet's client kubeconfig (system:node:<name>) and serving key pair."""
        pki = self.control_plane.pki
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        ca_key = load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        directory = self.state_dir / "pki"
        directory.mkdir(parents=True, exist_ok=True)
        client_key = pki_.new_key()
        client = pki_.issue(
            pki_.name(f"system:node:{self.name}", "system:nodes"),
            client_key,
            ca_cert.subject,
            ca_key,  # type: ignore[arg-type]
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        _write_key(directory / "kubelet-client.key", client_key)
        _write_cert(directory / "kubelet-client.crt", client)
        serving_key = pki_.new_key()
        sans: list[x509.GeneralName] = [
            x509.DNSName(self.name),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        serving = pki_.issue(
            pki_.name(self.name),
            serving_key,
            ca_cert.subject,
            ca_key,  # type: ignore[arg-type]
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=sans,
        )
        _write_key(directory / "kubelet.key", serving_key)
        _write_cert(directory / "kubelet.crt", serving)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "chscale",
                    "cluster": {
                        "server": self.control_plane.server_url,
                        "certificate-authority": str(pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "kubelet",
                    "user": {
                        "client-certificate": str(directory / "kubelet-client.crt"),
                        "client-key": str(directory / "kubelet-client.key"),
                    },
                }
            ],
            "contexts": [{"name": "kubelet", "context": {"cluster": "chscale", "user": "kubelet"}}],
            "current-context": "kubelet",
        }
        path = self.state_dir / "kubelet.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        return path, directory / "kubelet.crt", directory / "kubelet.key"

    def _start_kubelet(self, kubelet: str) -> None:
        kubeconfig, cert, key = self._credentials()
        pki = self.control_plane.pki
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1 (hybrid); v1.35 refuses it unless told.
            "failCgroupV1": False,
            "address": "127.0.0.1",
            "port": _free_port(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "tlsCertFile": str(cert),
            "tlsPrivateKeyFile": str(key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(pki.ca_cert)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "podLogsDir": str(self.run_dir / "logs"),
            "volumePluginDir": str(self.run_dir / "volume-plugins"),
            "failSwapOn": False,
            "resolvConf": "",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            # A shared CI disk is often fuller than the defaults allow: no disk pressure
            # evictions or image GC for a test bench's handful of pods.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        config_path = self.state_dir / "kubelet.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        argv = [
            *self._cpu_view(),
            kubelet,
            f"--config={config_path}",
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            f"--root-dir={self.kubelet_root}",
            f"--cert-dir={self.state_dir / 'pki'}",
            "--v=1",
        ]
        if labels:
            argv.append(f"--node-labels={labels}")
        self.children["kubelet"] = Child("kubelet", argv, self.logs / "kubelet.log")

    def _cpu_view(self) -> list[str]:
        """The command prefix that shows the kubelet ``cpus`` CPUs (nothing if it is the
        machine's count, or none was asked for).

        The kubelet's capacity is cAdvisor's count of the online CPU threads it finds
        under /sys/devices/system/node/node*/cpu*, and no flag or configuration overrides
        it. A test bench's node must offer what the seed's VMs ask for (8 to 12 vCPUs) on
        a machine with 2, so the kubelet runs in a mount namespace of its own where that
        directory lists the machine's CPUs several times over, as NUMA nodes of their own.
        The CPU ids stay the machine's: the kubelet writes the set of them into the
        kubepods cpuset, which the kernel checks against the CPUs there are. Nothing
        else changes: containerd and runc, in the machine's namespace, put the pods' CPU
        limits into real cgroup quotas (a quota may exceed the CPUs there are), and the
        VMM simulator's vCPUs use no CPU of their own. The kubelet's volume mounts must
        still reach runc, so its root directory is made a shared mount first (this
        machine's mounts are private) and the namespace keeps that propagation."""
        real = sorted(_online_cpus())
        if self.cpus is None or self.cpus == len(real):
            return []
        view = self.run_dir / "cpu-view"
        for index in range(self.cpus):
            node, cpu = divmod(index, len(real))
            topology = view / f"node{node}" / f"cpu{real[cpu]}" / "topology"
            topology.mkdir(parents=True)
            (topology / "core_id").write_text(f"{index}\n")
            (topology / "physical_package_id").write_text("0\n")
        with contextlib.suppress(OSError):  # the node's memory: only node0 has it
            meminfo = Path("/sys/devices/system/node/node0/meminfo").read_text()
            (view / "node0" / "meminfo").write_text(meminfo)
        root = str(self.kubelet_root)
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        for argv in (["mount", "--bind", root, root], ["mount", "--make-shared", root]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if done.returncode:
                raise RealNodeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        script = 'mount --bind "$1" /sys/devices/system/node && shift && exec "$@"'
        return [
            "unshare", "--mount", "--propagation", "unchanged", "--",
            "/bin/sh", "-c", script, "sh", str(view),
        ]  # fmt: skip

    # --- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Leave nothing behind; safe to call twice and after a failed start."""
        kubelet = self.children.pop("kubelet", None)
        if kubelet is not None:
            kubelet.stop()
        self._kill_cgroup_tasks()
        self._kill_shims()
        containerd = self.children.pop("containerd", None)
        if containerd is not None:
            containerd.stop()
        self._unmount_all()
        self._remove_cgroups()
        self._delete_bridge()
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _cgroup_dirs(self) -> list[Path]:
        """Every directory of this run's cgroup tree, deepest first."""
        found: list[Path] = []
        for hierarchy in cgroup_hierarchies():
            top = hierarchy / self.cgroup_root.lstrip("/")
            if top.is_dir():
                found += [Path(d) for d, _, _ in os.walk(top)]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)

    def _kill_cgroup_tasks(self) -> None:
        for _ in range(3):
            pids: set[int] = set()
            for directory in self._cgroup_dirs():
                with contextlib.suppress(OSError, ValueError):
                    pids |= {int(x) for x in (directory / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(alive(p) for p in pids):
                time.sleep(0.05)

    def _shim_pids(self) -> list[int]:
        needle = f"-address {self.containerd_socket}"
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "containerd-shim" in cmdline and needle in cmdline:
                found.append(int(entry.name))
        return found

    def _kill_shims(self) -> None:
        pids = self._shim_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)

    def _own_mounts(self) -> list[str]:
        roots = (str(self.run_dir) + "/", str(self.state_dir) + "/")
        return [p for p, _, _ in _mounts() if p.startswith(roots) or p == str(self.run_dir)]

    def _unmount_all(self) -> None:
        for _ in range(5):
            mounts = self._own_mounts()
            if not mounts:
                return
            for point in sorted(set(mounts), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)

    def _remove_cgroups(self) -> None:
        for _ in range(20):
            left = self._cgroup_dirs()
            if not left:
                return
            for directory in left:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if self._cgroup_dirs():
                self._kill_cgroup_tasks()
                time.sleep(0.1)

    def _bridge_exists(self) -> bool:
        return Path("/sys/class/net", self.bridge).exists()

    def _delete_bridge(self) -> None:
        if self._bridge_exists():
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, timeout=30)

    def leftovers(self) -> list[str]:
        """What this run would leave on the machine: empty after ``stop()``."""
        left = [f"mount {m}" for m in self._own_mounts()]
        left += [f"cgroup {d}" for d in self._cgroup_dirs()]
        left += [f"shim pid {p}" for p in self._shim_pids()]
        left += [f"process {c.name}" for c in self.children.values() if c.alive()]
        if self._bridge_exists():
            left.append(f"bridge {self.bridge}")
        if self.run_dir.exists():
            left.append(f"directory {self.run_dir}")
        return left


def cleanup_stale_runs() -> list[str]:
    """Tear down the runs whose owning process is gone (killed before its ``stop()``):
    their shims, containers, mounts, cgroups and bridges would otherwise stay for good.
    Returns the run ids swept."""
    swept = []
    for run_dir in Path(tempfile.gettempdir()).glob(f"{RUN_PREFIX}*"):
        try:
            owner = int((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not started far enough to own anything but the directory
        if alive(owner):
            continue
        run_id = run_dir.name[len(RUN_PREFIX) :]
        # The state directory is unknown here; nothing is mounted there.
        stale = RealNode(run_id, run_dir / "state", ControlPlane(), run_id=run_id)
        log.warning("sweeping a real node run whose owner died", extra={"run": run_id})
        stale.stop()
        swept.append(run_id)
    return swept


def stack_labels(stack_id: str) -> dict[str, str]:
    return {STACK_LABEL: stack_id}


__all__ = ["BuildError", "RealNode", "RealNodeError", "Verdict", "machine_allows", "stack_labels"]
