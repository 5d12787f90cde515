"""How much memory this process may still use: the least of MemAvailable, its rlimits and its
cgroup's limit (read before allocating a lowered model's matrices, or materializing a
structured model's CSR)."""

from __future__ import annotations

import math
import os

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# Where the process's cgroups are listed and mounted (tests point them elsewhere).
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


def available_memory_bytes() -> float:
    """The memory this process may still use: the least of MemAvailable (else the physical
    memory), the room left under its rlimits (RLIMIT_AS, RLIMIT_DATA) and under its cgroup's
    memory limit. A limit the machine has but the process cannot see is not counted."""
    return min(_system_memory(), _rlimit_room(), _cgroup_room())


def _system_memory() -> float:
    """MemAvailable from /proc/meminfo, else the physical memory, else unlimited."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def _rlimit_room() -> float:
    """The soft RLIMIT_AS / RLIMIT_DATA less what the process already maps (VmSize / VmData)."""
    if resource is None:
        return math.inf
    room = math.inf
    for limit, used_key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and soft >= 0:
            room = min(room, max(float(soft) - _process_status_bytes(used_key), 0.0))
    return room


def _process_status_bytes(key: str) -> float:
    """A "kB" field of /proc/self/status in bytes (0 where unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def _cgroup_room() -> float:
    """Memory left under the tightest limit of this process's cgroup and its ancestors: cgroup v2
    memory.max less memory.current, v1 memory.limit_in_bytes less memory.usage_in_bytes, the
    usage without the inactive file cache (reclaimable, as ``docker stats`` counts it)."""
    room = math.inf
    for folder, limit_file, usage_file, cache_key in _cgroup_folders():
        limit = _read_number(os.path.join(folder, limit_file))
        if limit is None:
            continue
        usage = _read_number(os.path.join(folder, usage_file)) or 0.0
        cache = _memory_stat(os.path.join(folder, "memory.stat")).get(cache_key, 0.0)
        room = min(room, max(limit - max(usage - cache, 0.0), 0.0))
    return room


def _cgroup_folders() -> list[tuple[str, str, str, str]]:
    """(folder, limit file, usage file, stat key of the inactive file cache) for the process's
    memory cgroup and each ancestor, read from /proc/self/cgroup (v2 and v1 layouts)."""
    try:
        with open(PROC_CGROUP) as cgroups:
            lines = cgroups.read().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            root, files = CGROUP_ROOT, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            root, files = (
                os.path.join(CGROUP_ROOT, "memory"),
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            )
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            folders.append((os.path.join(root, *parts[:depth]), *files))
    return folders


def _read_number(path: str) -> float | None:
    """A cgroup file's number; None when absent or "max" (no limit)."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _memory_stat(path: str) -> dict[str, float]:
    try:
        with open(path) as file:
            return {key: float(value) for key, value in (line.split()[:2] for line in file if len(line.split()) >= 2)}
    except (OSError, ValueError):
        return {}
