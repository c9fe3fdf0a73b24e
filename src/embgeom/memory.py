"""Will a run's accumulators fit where they live?

Their final size is known before the stream starts: the tokenizer pre-pass counts
the token types, and exact per-type statistics hold a float64 mean per type and
layer. A run that cannot fit is refused then, with the numbers and the fix, rather
than killed for memory hours later. On CPU the per-type rows are touched only as
types appear, so such a run would otherwise fail late; on a GPU the rows are
allocated at once and the failure would be an allocator traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import EmbgeomError

# Leave room for the batch, the forward pass's activations and everything else.
USABLE_FRACTION = 0.9


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


# (limit file, usage file, memory.stat key of the page cache) for cgroup v2 and v1
_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "file"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")}


def _cgroup_dirs():
    """(version, directory) of this process's memory cgroup, most specific first."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            version, mount = "v2", Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):
            version, mount = "v1", Path("/sys/fs/cgroup/memory")
        else:
            continue
        # Inside a container the process's own cgroup is often mounted as the root.
        for d in (mount / rel.lstrip("/"), mount):
            yield version, d


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup may still take, if it has a limit: inside a
    container /proc/meminfo shows the host's memory, not the container's. The page
    cache counts towards a cgroup's usage but is given back on demand, so it counts
    as room."""
    for version, d in _cgroup_dirs():
        limit_name, usage_name, cache_key = _CGROUP_FILES[version]
        try:
            limit = (d / limit_name).read_text().strip()
            usage = int((d / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # no limit (v1 writes a huge number)
            return None
        cache = 0
        try:
            for line in (d / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - max(0, usage - cache))
    return None


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo, capped by the cgroup's room; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
        else:
            return None
    except (OSError, ValueError):
        return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def available_bytes(device) -> int | None:
    """Bytes free for new allocations on `device` (a CUDA GPU: its free memory; the
    CPU: the host's available memory), or None where that cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        return _host_available()
    return None


# What shrinks each part of the statistics, for the refusal's message.
FIXES = {
    "per-type means": "keep them at a few layers (--type-layers 0 -1 ...), or pass --token-types none "
                      "(no per-type statistics), --token-types string (fewer types) or a smaller --max-tokens",
    "ID sample": "pass a smaller --id-sample (0: no intrinsic dimension)",
    "covariances": "free memory there or use a device with more (they are fixed by the model's depth and width)",
}


def check_accumulators_fit(parts: dict, device, *, sharers: int = 1) -> None:
    """Raise EmbgeomError when statistics whose parts take `parts` = {name: (bytes per
    process, what it is)} cannot fit on `device`. `sharers` processes on this machine
    each hold their own (torchrun ranks on the CPU). The message lists the parts,
    largest first, and how to shrink the largest (`FIXES`)."""
    free = available_bytes(device)
    per_host = sharers if torch.device(device).type == "cpu" else 1
    need = sum(b for b, _ in parts.values()) * per_host
    if free is None or need <= USABLE_FRACTION * free:
        return
    where = f"{torch.device(device)}" + (f", {sharers} processes" if per_host > 1 else "")
    ranked = sorted(parts.items(), key=lambda kv: -kv[1][0])
    listed = "; ".join(f"{name} {_gib(b * per_host)} ({what})" for name, (b, what) in ranked)
    raise EmbgeomError(f"the statistics need about {_gib(need)} ({where}) but only {_gib(free)} is available: "
                       f"{listed}. For the {ranked[0][0]}: {FIXES.get(ranked[0][0], 'free memory')}")


def processes_on_this_machine() -> int:
    """torchrun's LOCAL_WORLD_SIZE, 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1
