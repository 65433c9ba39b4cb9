"""Describe the machine a benchmark ran on, for the report header and the JSON output.

Versions are read from package metadata (``importlib.metadata``), so describing the machine imports
neither torch nor keras; a package that is not installed is reported as ``None``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from typing import Any

__all__ = ["copy_bandwidth", "machine_info", "format_machine"]

_PACKAGES = ("pyloader", "numpy", "torch", "keras", "pillow", "psutil")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_total() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def copy_bandwidth(threads: int, *, mebibytes: int = 256, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth with ``threads`` threads, in GB/s (best of repeats).

    Each thread copies its share of a ``mebibytes`` buffer with ``numpy.copyto`` (which releases
    the GIL), so the figure is what plain memcpy achieves here: the yardstick for gather loaders.
    Bytes copied (not bytes read plus written) per second.
    """
    import threading

    import numpy as np

    src = np.ones(mebibytes << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault every page in before timing
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=part) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, len(src) / (time.perf_counter() - start) / 1e9)
    return best


def machine_info(*, bandwidth: bool = True) -> dict[str, Any]:
    """Return a JSON-ready description of this machine and the library versions.

    Returns:
        A dict with ``cpu_count`` (logical CPUs), ``cpu_affinity`` (CPUs this process may use),
        ``cpu_model``, ``memory_bytes``, ``platform``, ``python``, ``executable``, ``versions``
        (package name to version string or None), ``load_average`` (1/5/15 min, or None) and
        ``copy_gbps`` (``{"1": GB/s, "2": GB/s}`` with 1 and 2 threads, see
        :func:`copy_bandwidth`; None when ``bandwidth`` is false).
    """
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_total(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "versions": {name: _version(name) for name in _PACKAGES},
        "load_average": _load_average(),
        "copy_gbps": {str(t): round(copy_bandwidth(t), 2) for t in (1, 2)} if bandwidth else None,
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews a benchmark."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def format_machine(info: dict[str, Any]) -> str:
    """Render :func:`machine_info` as two human-readable lines.

    Args:
        info: The dict returned by :func:`machine_info`.

    Returns:
        The text, without a trailing newline.
    """
    mem = info.get("memory_bytes")
    mem_text = f", {mem / 2**30:.1f} GiB RAM" if mem else ""
    cpus = f"{info['cpu_count']} CPUs"
    if info.get("cpu_affinity") not in (None, info["cpu_count"]):
        cpus += f" ({info['cpu_affinity']} usable)"
    versions = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in info["versions"].items()
    )
    load = info.get("load_average")
    if load:
        busy = load[0] > (info.get("cpu_affinity") or info["cpu_count"] or 1) * 0.5
        cpus += f", load average {load[0]:g} at start" + (" (busy: expect noise)" if busy else "")
    copy = info.get("copy_gbps")
    copy_text = (
        f"\nmemory:  copy bandwidth {copy['1']:.1f} GB/s with 1 thread, {copy['2']:.1f} GB/s with 2"
        if copy
        else ""
    )
    return (
        f"machine: {cpus}, {info['cpu_model']}{mem_text}, {info['platform']}\n"
        f"python:  {info['python']}; {versions}{copy_text}"
    )
