"""Typed views of the Cloud Hypervisor API answers the project reads.

Only the fields chscale uses are declared; unknown fields are ignored, and optional ones
may be omitted or ``null`` (older releases omit ``memory_actual_size``; ``hotplug_size``
and ``hotplugged_size`` are null until configured or requested).
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs


@attrs.frozen(slots=True)
class CpusConfig:
    boot_vcpus: int
    max_vcpus: int


@attrs.frozen(slots=True)
class MemoryConfig:
    size: int
    hotplug_method: str | None = None
    hotplug_size: int | None = None
    hotplugged_size: int | None = None


@attrs.frozen(slots=True)
class VmConfig:
    cpus: CpusConfig
    memory: MemoryConfig


@attrs.frozen(slots=True)
class VmInfo:
    state: str
    config: VmConfig
    memory_actual_size: int | None = None

    @property
    def guest_memory(self) -> int:
        """What the guest holds: ``memory_actual_size`` when reported (>= v52), else the
        boot size plus the requested hotplug amount."""
        if self.memory_actual_size is not None:
            return self.memory_actual_size
        return self.config.memory.size + (self.config.memory.hotplugged_size or 0)


@attrs.frozen(slots=True)
class VmmPing:
    version: str | None = None
    build_version: str | None = None
    pid: int | None = None
    features: tuple[str, ...] = ()


def _strict_int(value: Any, _type: type) -> int:
    # cattrs would turn "4" or 4.7 into 4; a VMM that sends those is broken, say so.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _strict_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


converter = cattrs.Converter(forbid_extra_keys=False)
converter.register_structure_hook(int, _strict_int)
converter.register_structure_hook(str, _strict_str)


def structure(value: Any, cls: type[Any]) -> Any:
    """``cls`` from decoded JSON; raises ValueError naming the offending field."""
    try:
        return converter.structure(value, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
        notes = cattrs.transform_error(exc) if isinstance(exc, cattrs.BaseValidationError) else []
        raise ValueError("; ".join(notes) or str(exc)) from exc
