"""preflight: what this machine can give, read before anything large is allocated.

Host RAM is what /proc/meminfo calls MemAvailable, or less where a memory cgroup (a container, a batch
job) caps the process; device memory is what the driver reports free; locked memory is `ulimit -l`.
Page-locking can still fail when all of these allow it: pin_in_place then leaves the memory pageable and
says, once, how much slower its copies measured.
"""
from __future__ import annotations

import os
import resource
import shutil
import time
import warnings
import weakref

import torch

from mtc.config import format_bytes

_CGROUP_FILES = (
    # (limit, usage, stat file, its reclaimable page-cache field): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)
UNLIMITED = 1 << 60
"""A cgroup limit at or above this is the kernel's 'max' (v1 writes it as a huge page-aligned number)."""


def host_meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, ...); None off Linux."""
    return _proc_kilobytes("/proc/meminfo", field)


def process_status_bytes(field: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, ...); None off Linux."""
    return _proc_kilobytes("/proc/self/status", field)


def _proc_kilobytes(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_number(path: str, field: str | None = None) -> int | None:
    """The number in a one-value file, or `field`'s in a 'name value' file; None if absent or 'max'."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if field is None or (len(parts) == 2 and parts[0] == field):
                    return int(parts[-1]) if parts[-1].isdigit() else None
    except OSError:
        pass
    return None


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, what the cgroup can still take, counting its reclaimable page cache) of this process's memory
    cgroup; None where there is no limit."""
    for limit_file, usage_file, stat_file, reclaimable in _CGROUP_FILES:
        limit = _read_number(limit_file)
        if limit is None or limit >= UNLIMITED:
            continue
        usage = _read_number(usage_file) or 0
        return limit, max(0, limit - usage + (_read_number(stat_file, reclaimable) or 0))
    return None


def available_host_bytes() -> int | None:
    """What the host can give this process now without swapping: MemAvailable, or less under a cgroup
    limit (None off Linux)."""
    available, cgroup = host_meminfo("MemAvailable"), cgroup_memory()
    if cgroup is not None:
        available = cgroup[1] if available is None else min(available, cgroup[1])
    return available


def describe_host_memory() -> str:
    """Where available_host_bytes comes from, for error messages."""
    parts = []
    if (available := host_meminfo("MemAvailable")) is not None:
        parts.append(f"MemAvailable {format_bytes(available)}")
    if (cgroup := cgroup_memory()) is not None:
        parts.append(f"a cgroup limit of {format_bytes(cgroup[0])} with {format_bytes(cgroup[1])} left")
    return ", ".join(parts) or "unknown off Linux"


def free_disk_bytes(path) -> tuple[str, int]:
    """(the nearest directory at or above `path` that exists, the free bytes of its disk): where a directory
    still to be made at `path` will take its room."""
    directory = os.path.abspath(os.fspath(path))
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    return directory, shutil.disk_usage(directory).free


def locked_memory_limit() -> int | None:
    """`ulimit -l` in bytes; None when unlimited (or unknown)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def check_locked_memory(pinned_bytes: int) -> None:
    """Warn when `ulimit -l` is below what the store pins. Only a warning: the CUDA driver pins without
    mlock on most systems, and where it does not, pin_in_place falls back to pageable memory."""
    limit = locked_memory_limit()
    if limit is not None and pinned_bytes > limit:
        warnings.warn(f"ulimit -l is {format_bytes(limit)} but mtc will page-lock {format_bytes(pinned_bytes)} "
                      f"of host memory for copies; if pinning fails they run from pageable memory, several times "
                      f"slower (raise the limit with `ulimit -l unlimited` or in /etc/security/limits.conf)",
                      stacklevel=3)


def check_gpu_memory(gpu_mem: int, device: torch.device) -> None:
    """Refuse a budget larger than the device's free memory, naming the largest that fits now."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if gpu_mem > free:
        held = total - free
        raise ValueError(f"gpu_mem={format_bytes(gpu_mem)} is more than {device} has free: {format_bytes(free)} of "
                         f"{format_bytes(total)} ({format_bytes(held)} held by this or other processes); pass "
                         f"gpu_mem='{free // 2**20}MiB' or less, or free the device")


_unpinned = {"bytes": 0, "warned": False}


def pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock a tensor's memory where it lies (cudaHostRegister); False if the driver refuses, and the
    tensor stays pageable: its copies still work, synchronously and slower (the first refusal warns with
    the slowdown measured here).

    torch's pinned allocator rounds each request up to a power of two, which would cost up to twice
    the stream buffers' size in locked RAM; registering our own allocation costs exactly its size.
    """
    cudart = torch.cuda.cudart()
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    error = int(cudart.cudaHostRegister(pointer, size, 0))
    if error != 0:
        _unpinned["bytes"] += size
        if not _unpinned["warned"]:
            _unpinned["warned"] = True
            limit = locked_memory_limit()
            warnings.warn(f"could not page-lock {format_bytes(size)} of host memory (cudaHostRegister error {error}; "
                          f"ulimit -l: {'unlimited' if limit is None else format_bytes(limit)}); mtc goes on with "
                          f"pageable memory, whose copies to the GPU measured {pageable_slowdown()} here",
                          stacklevel=2)
        return False
    weakref.finalize(tensor.untyped_storage(), cudart.cudaHostUnregister, pointer)
    return True


def unpinned_bytes() -> int:
    """Host bytes that pin_in_place could not lock in this process."""
    return _unpinned["bytes"]


def pageable_slowdown(nbytes: int = 64 << 20) -> str:
    """'A GB/s pageable against B GB/s pinned (Cx slower)', timed on one copy of each to the current device."""
    device = torch.device("cuda", torch.cuda.current_device())
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def rate(source: torch.Tensor) -> float:
        target.copy_(source, non_blocking=True)  # once untimed: the first copy pays for setting up
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)
        return nbytes / (time.perf_counter() - start)
    try:
        pageable, pinned = rate(torch.ones(nbytes, dtype=torch.uint8)), rate(torch.ones(nbytes, dtype=torch.uint8,
                                                                                        pin_memory=True))
    except RuntimeError as error:  # pinning even 64 MiB failed: no comparison to make
        return f"(no pinned buffer to compare with: {error})"
    return f"{pageable / 1e9:.1f} GB/s against {pinned / 1e9:.1f} GB/s pinned ({pinned / pageable:.1f}x slower)"
