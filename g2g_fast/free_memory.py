"""How much memory this process can still get, on the host and on a GPU (issue 24): what
`memory_estimate.check` compares a setting's estimate with.

Host: the least of the system's MemAvailable, the limit of this process's cgroup (and of its
ancestors) less its use, with reclaimable page cache counted as free, and `ulimit -v` less the
process's virtual size. GPU: `torch.cuda.mem_get_info`.
"""
from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import torch


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    """Bytes left under the memory limits of this process's cgroup and its ancestors (v2, or v1's
    memory controller), counting reclaimable page cache as free; None without a limit."""
    frees = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, rel = line.split(":", 2)
        if hier == "0":  # v2: memory.max / memory.current in every folder up to the root
            folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
            for d in (folder, *folder.parents):
                if not str(d).startswith("/sys/fs/cgroup"):
                    break
                limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                if limit is not None and used is not None:
                    frees.append(limit - used + _inactive_file(d / "memory.stat"))
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            for base in (d, Path("/sys/fs/cgroup/memory")):
                limit, used = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
                if limit is not None and used is not None and limit < 1 << 60:  # v1's "no limit" is ~2**63
                    frees.append(limit - used + _inactive_file(base / "memory.stat"))
                    break
    return max(0, min(frees)) if frees else None


def _inactive_file(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _address_space_free() -> int | None:
    """Bytes left under `ulimit -v` (RLIMIT_AS), which counts this process's virtual size."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    size = _meminfo_self("VmSize")
    return None if size is None else max(0, limit - size)


def _meminfo_self(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_free() -> tuple[float, str]:
    """(bytes, what they are) of host memory this process can still get: the least of the system's
    MemAvailable, its cgroup's limit less its use, and `ulimit -v` less its virtual size."""
    options = [(_meminfo("MemAvailable"), "free"), (_cgroup_free(), "free under its cgroup's memory limit"),
               (_address_space_free(), "left under ulimit -v")]
    known = [(v, why) for v, why in options if v is not None]
    if not known:  # no /proc (not Linux): what the OS reports, else no limit known
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free"
        except (ValueError, OSError, AttributeError):
            return math.inf, "free"
    return min(known)


def device_free(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), "free"
    return host_free()
