"""The CLI without a cluster: every option explained, the kubectl plugin name, the seed's
units, the kubeconfig it picks, the final status and the exit codes (a scripted API)."""

from __future__ import annotations

import argparse
import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from adapters.k8s.client import ApiError, NotFound
from apps.cli import main as cli
from apps.cli.main import EXIT_CODES, SIMULATE_EXIT_CODES, Exit, build_parser, kubeconfig_path
from apps.cli.vmops import resize_vm, status_report

ROOT = Path(__file__).resolve().parents[2]


def _parsers(parser: argparse.ArgumentParser, path: str = "chscale") -> list[Any]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_option_and_command_has_help_text() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{path} {c.dest}" for c in action._choices_actions if not (c.help or "")
                ]
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_exit_codes_are_in_every_help_epilog() -> None:
    for path, parser in _parsers(build_parser()):
        if path.endswith("simulate"):
            assert parser.epilog == SIMULATE_EXIT_CODES  # no cluster: codes of its own
            continue
        assert parser.epilog == EXIT_CODES, path
    for code in Exit:
        assert f"\n  {int(code):<4} " in EXIT_CODES, code


def test_installed_as_a_kubectl_plugin_too(monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-chscale"] == scripts["chscale"] == "apps.cli.main:main"
    monkeypatch.setattr("sys.argv", ["/venv/bin/kubectl-chscale", "resize"])
    assert build_parser().prog == "kubectl chscale"
    monkeypatch.setattr("sys.argv", ["/venv/bin/chscale"])
    assert build_parser().prog == "chscale"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "0"], "--cpus: must be at least 1"),
        (["--cpus", "two"], "--cpus: 'two' is not a whole number"),
        (["--sockets", "-1"], "--sockets: must be at least 1"),
        (["--memory", "8Gx"], "--memory: '8Gx' is not a Kubernetes quantity"),
        (["--memory", "0"], "--memory: must be positive"),
        (["--cpus", "4", "--sockets", "2"], "--sockets: not allowed with argument --cpus"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["resize", "vm", *argv])
    assert exit_.value.code == Exit.USAGE
    assert message in capsys.readouterr().err


def test_kubeconfig_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    ns = argparse.Namespace
    assert kubeconfig_path(ns(kubeconfig="k", state_dir="s")) == "k"
    assert kubeconfig_path(ns(kubeconfig=None, state_dir="s")) == "s/kubeconfig"
    # Nothing else: the local stack's default directory.
    assert kubeconfig_path(ns(kubeconfig=None, state_dir=None)) == str(
        cli.DEFAULT_STATE / "kubeconfig"
    )
    # As kubectl would (which is what a kubectl plugin is given): $KUBECONFIG...
    monkeypatch.setenv("KUBECONFIG", "/x/config")
    assert kubeconfig_path(ns(kubeconfig=None, state_dir=None)) is None
    # ... or ~/.kube/config.
    monkeypatch.delenv("KUBECONFIG")
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("{}")
    assert kubeconfig_path(ns(kubeconfig=None, state_dir=None)) is None


# --- resize against a scripted API ----------------------------------------------------


def vm_obj(sockets: int = 2, cores: int = 4, memory: str = "4Gi") -> dict[str, Any]:
    return {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "metadata": {"name": "my-vm", "namespace": "default", "generation": 1, "uid": "u"},
        "spec": {
            "instance": {
                "cpu": {"sockets": sockets, "coresPerSocket": cores},
                "memory": {"size": memory},
            }
        },
        "status": {
            "phase": "Running",
            "observedGeneration": 1,
            "allocated": {"vcpus": sockets * cores, "memory": memory},
            "nodeName": "node-a",
            "conditions": [
                {"type": "Resized", "status": "True", "reason": "Resized", "message": "ok"}
            ],
        },
    }


class ScriptedKube:
    """A VM that the 'operator' converges (or refuses) on the n-th read after a patch."""

    def __init__(self, obj: dict[str, Any] | None, *, outcome: str = "converge") -> None:
        self.obj = obj
        self.outcome = outcome
        self.patches: list[dict[str, Any]] = []
        self.reads_since_patch = 0
        self.patch_error: ApiError | None = None

    def get(self, path: str, **_: Any) -> dict[str, Any]:
        if self.obj is None:
            raise NotFound(404, "NotFound", "not found")
        self.reads_since_patch += 1
        if self.patches and self.reads_since_patch == 3:
            self._settle()
        return copy.deepcopy(self.obj)

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.obj is not None
        if self.patch_error is not None:
            raise self.patch_error
        self.patches.append(body)
        instance = self.obj["spec"]["instance"]
        for key, value in body["spec"]["instance"].items():
            instance[key] = {**instance.get(key, {}), **value}
        self.obj["metadata"]["generation"] += 1
        self.obj["status"]["phase"] = "PodResizeInProgress"
        self.reads_since_patch = 0
        return copy.deepcopy(self.obj)

    def _settle(self) -> None:
        assert self.obj is not None
        status, instance = self.obj["status"], self.obj["spec"]["instance"]
        generation = self.obj["metadata"]["generation"]
        if self.outcome == "never":
            return
        status["phase"] = "Running"
        status["observedGeneration"] = generation
        if self.outcome == "refuse":
            status["conditions"] = [
                {
                    "type": "Resized",
                    "status": "False",
                    "reason": "PodResizeInfeasible",
                    "message": "Node didn't have enough capacity: memory",
                    "observedGeneration": generation,
                }
            ]
            return
        cpu = instance["cpu"]
        status["allocated"] = {
            "vcpus": cpu["sockets"] * cpu["coresPerSocket"],
            "memory": instance["memory"]["size"],
        }


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Any:
    def run_with(kube: ScriptedKube, *argv: str) -> int:
        monkeypatch.setattr(cli, "load_api_client", lambda _path: object())
        monkeypatch.setattr(cli, "Kube", lambda _client: kube)
        return cli.main(["resize", "my-vm", "--kubeconfig", "k", *argv])

    return run_with


def test_resize_waits_and_prints_the_final_status(run: Any, capsys: Any) -> None:
    kube = ScriptedKube(vm_obj())
    assert run(kube, "--cpus", "12", "--memory", "8Gi", "--wait") == Exit.OK
    assert kube.patches == [
        {
            "spec": {
                "instance": {"cpu": {"sockets": 2, "coresPerSocket": 6}, "memory": {"size": "8Gi"}}
            }
        }
    ]
    out = capsys.readouterr().out
    assert "spec updated (generation 2)" in out
    assert "ok: resized" in out
    assert "  phase:     Running" in out
    assert "  spec:      12 vCPUs (2 sockets x 6 cores), memory 8Gi" in out
    assert "  allocated: 12 vCPUs, memory 8Gi" in out
    assert "  Resized=True (Resized): ok" in out


def test_resize_in_the_seeds_units(run: Any) -> None:
    kube = ScriptedKube(vm_obj())
    assert run(kube, "--sockets", "4", "--cores-per-socket", "4") == Exit.OK
    assert run(kube, "--cores-per-socket", "5") == Exit.OK  # the sockets stay
    assert [p["spec"]["instance"]["cpu"] for p in kube.patches] == [
        {"sockets": 4, "coresPerSocket": 4},
        {"sockets": 4, "coresPerSocket": 5},
    ]


def test_cpus_that_the_sockets_do_not_divide_become_one_socket() -> None:
    kube = ScriptedKube(vm_obj())
    resize_vm(kube, "default", "my-vm", 7, None)  # type: ignore[arg-type]
    assert kube.patches[-1]["spec"]["instance"]["cpu"] == {"sockets": 1, "coresPerSocket": 7}
    with pytest.raises(ValueError, match="not both"):
        resize_vm(kube, "default", "my-vm", 7, None, sockets=2)  # type: ignore[arg-type]


def test_exit_codes(run: Any, capsys: Any) -> None:
    assert run(ScriptedKube(None), "--cpus", "4") == Exit.NOT_FOUND
    assert "no such VirtualMachine" in capsys.readouterr().err
    refusing = ScriptedKube(vm_obj())
    refusing.patch_error = ApiError(
        422, "Invalid", "spec.instance.memory.size: must be a multiple of 2Mi"
    )
    assert run(refusing, "--memory", "3Gi") == Exit.REFUSED
    assert "spec.instance.memory.size" in capsys.readouterr().err
    assert run(ScriptedKube(vm_obj(), outcome="refuse"), "--memory", "200Gi", "--wait") == (
        Exit.REFUSED
    )
    out = capsys.readouterr().out
    assert "resize refused: PodResizeInfeasible" in out
    assert "Resized=False (PodResizeInfeasible)" in out
    never = ScriptedKube(vm_obj(), outcome="never")
    assert run(never, "--cpus", "12", "--wait", "--timeout", "0.3") == Exit.TIMEOUT
    assert run(ScriptedKube(vm_obj())) == Exit.USAGE
    assert run(ScriptedKube(vm_obj()), "--cpus", "2", "--cores-per-socket", "2") == Exit.USAGE


def test_no_kubeconfig_is_its_own_exit_code(capsys: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    assert cli.main(["resize", "vm", "--cpus", "2", "--kubeconfig", str(missing)]) == (
        Exit.UNREACHABLE
    )
    assert str(missing) in capsys.readouterr().err


def test_status_report_of_an_invalid_spec_says_so() -> None:
    obj = vm_obj()
    obj["spec"]["instance"]["memory"] = {"size": "lots"}
    assert "invalid (see the SpecValid condition)" in status_report(obj)
