"""``chscale-ch-sim``'s command line: every guest knob parses into ``Knobs``, and bad
values are refused naming the flag."""

from __future__ import annotations

import pytest

from sim.cloudhypervisor import DEFAULT_VMM_OVERHEAD, MIB, NEVER, PLUG_NEVER, Knobs
from testbed.chsim.main import UsageError, main, parse_args, plan


def knobs(*flags: str) -> Knobs:
    return plan(parse_args(["--api-socket", "/tmp/x.sock", *flags])).knobs


def test_defaults_are_a_cooperative_guest_at_the_latest_version():
    assert knobs() == Knobs()
    assert Knobs().eject_delay_s == 0.5 and Knobs().plug_rate is None
    assert Knobs().unplug_limit is None and Knobs().vmm_overhead == DEFAULT_VMM_OVERHEAD


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--sim-eject-delay", "never"], "eject_delay_s", NEVER),
        (["--sim-eject-delay", "NEVER"], "eject_delay_s", NEVER),
        (["--sim-eject-delay", "2.5"], "eject_delay_s", 2.5),
        (["--sim-eject-delay", "0"], "eject_delay_s", 0.0),
        (["--sim-plug-rate", "never"], "plug_rate", PLUG_NEVER),
        (["--sim-plug-rate", "0"], "plug_rate", None),
        (["--sim-plug-rate", "1G"], "plug_rate", float(1 << 30)),
        (["--sim-plug-rate", "512Mi"], "plug_rate", float(512 * MIB)),
        (["--sim-unplug-limit", "256Mi"], "unplug_limit", 256 * MIB),
        (["--sim-unplug-limit", "0"], "unplug_limit", 0),
        (["--sim-unplug-limit", "unlimited"], "unplug_limit", None),
        (["--sim-vmm-overhead", "100Mi"], "vmm_overhead", 100 * MIB),
        (["--sim-vmm-overhead", "0"], "vmm_overhead", 0),
        (["--sim-api-version", "50"], "api_version", 50),
    ],
)
def test_each_flag_sets_its_knob(flags, field, value):
    assert getattr(knobs(*flags), field) == value


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--sim-eject-delay", "soon"], "--sim-eject-delay"),
        (["--sim-eject-delay", "-1"], "--sim-eject-delay"),
        (["--sim-eject-delay", "inf"], "--sim-eject-delay"),
        (["--sim-eject-delay", "nan"], "--sim-eject-delay"),
        (["--sim-plug-rate", "fast"], "--sim-plug-rate"),
        (["--sim-unplug-limit", "-5"], "--sim-unplug-limit"),
        (["--sim-unplug-limit", "lots"], "--sim-unplug-limit"),
        (["--sim-vmm-overhead", "big"], "--sim-vmm-overhead"),
    ],
)
def test_bad_values_name_the_flag(flags, flag):
    with pytest.raises(UsageError, match=flag):
        knobs(*flags)


def test_bad_values_exit_2_before_binding_anything(tmp_path):
    sock = tmp_path / "api.sock"
    assert main(["--api-socket", str(sock), "--sim-eject-delay", "soon"]) == 2
    assert not sock.exists()


def test_help_documents_every_guest_knob(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "--sim-eject-delay SECONDS|never",
        "--sim-plug-rate BYTES_PER_S|0|never",
        "--sim-unplug-limit QUANTITY",
        "--sim-vmm-overhead QUANTITY",
        "--sim-api-version N",
        "sim.guest",
        "sim.exit",
    ):
        assert needle in text, needle


def test_rust_backtrace_is_a_flag_not_the_environment(monkeypatch):
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    assert knobs().rust_backtrace is False
    assert knobs("--sim-rust-backtrace").rust_backtrace is True
