"""What /proc/cpuinfo says about this CPU (no torch import: the MKL shim reads it before torch loads)."""

from __future__ import annotations


def field(*names: str) -> str:
    """The first line's value among ``names`` (e.g. "vendor_id"), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(names):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... or ""."""
    return field("vendor_id")


def model() -> str:
    return field("model name")


def flags() -> set[str]:
    """Instruction-set flags (x86 ``flags``, Arm ``Features``)."""
    return set(field("flags", "Features").split())
