"""disk: the NVMe tier. A group the plan places on disk keeps its fp32 optimizer state in a file under compile's
`nvme` directory: the Adam moments, and the master weights too where the stream copy is a buffer of its own (a
bf16 stage: 12 of its 14 bytes a parameter). The stream copy, which the copy-ins read, stays in RAM.

The CPU optimizer updates a disk group in a staging slab: its state is read ahead (the next disk group's read runs
while this one updates, on an I/O thread), updated, and written back on another I/O thread while the optimizer
goes on. Three slabs, each the largest disk group's bytes: one read ahead, one updating, one writing back. Files
are opened with O_DIRECT where the filesystem takes it (no page cache: the point is to not spend RAM), through
4 KiB-aligned slabs; elsewhere (tmpfs) with buffered I/O.

Everything else that reads or writes the state (checkpoints, named_parameters, replanning) goes through
DiskTier.state(group), after the optimizer thread has drained: the slabs read ahead are dropped first.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

BLOCK = 4096
"""O_DIRECT's alignment of buffers, offsets and lengths (the logical block size of NVMe drives is 512 or 4096)."""
IO_CHUNK = 64 << 20
"""Bytes one pread/pwrite moves: large enough to keep a drive's queue full, small enough to stay interruptible."""
SLABS = 3


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` (rounded up to BLOCK) whose address is BLOCK-aligned."""
    nbytes = _round(nbytes)
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    skip = -raw.data_ptr() % BLOCK
    return raw[skip:skip + nbytes]


def _round(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class DiskFile:
    """One group's state on disk: each named buffer in a BLOCK-aligned region of one file."""

    def __init__(self, path: str, names: tuple[str, ...], numel: int):
        self.path, self.names, self.numel = path, names, numel
        self.region = _round(numel * 4)  # fp32
        self.nbytes = self.region * len(names)
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0), 0o600)
        except OSError:  # tmpfs and some others refuse O_DIRECT
            self.direct = False
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, self.nbytes)

    def views(self, slab: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named fp32 buffers inside a slab that holds (or is to hold) this file."""
        return {name: slab[i * self.region:i * self.region + self.numel * 4].view(torch.float32)
                for i, name in enumerate(self.names)}

    def read(self, slab: torch.Tensor) -> None:
        self._io(os.preadv, slab[:self.nbytes])

    def write(self, slab: torch.Tensor) -> None:
        self._io(os.pwritev, slab[:self.nbytes])

    def _io(self, call, data: torch.Tensor) -> None:
        view = memoryview(data.numpy())
        for start in range(0, len(view), IO_CHUNK):
            piece = view[start:start + IO_CHUNK]
            done = 0
            while done < len(piece):
                try:
                    moved = call(self.fd, [piece[done:]], start + done)
                except OSError as error:
                    if not self.direct or error.errno != 22:  # EINVAL: the filesystem won't do O_DIRECT I/O
                        raise OSError(error.errno, f"{self.path}: {error.strerror}") from error
                    self._buffered()
                    continue
                if moved == 0:
                    raise OSError(f"{self.path}: short {'read' if call is os.preadv else 'write'} at byte "
                                  f"{start + done} of {len(view)}")
                done += moved

    def _buffered(self) -> None:
        os.close(self.fd)
        self.fd, self.direct = os.open(self.path, os.O_RDWR), False

    def close(self) -> None:
        os.close(self.fd)


class DiskTier:
    """The disk groups' files, the staging slabs and the I/O threads."""

    def __init__(self, directory: str):
        if not directory:
            raise ValueError(f"nvme={directory!r} is not valid; expected a directory for the optimizer state")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.root = os.path.join(directory, f".mtc-state-{os.getpid()}")
        _remove_leftovers(directory)
        os.makedirs(self.root, exist_ok=True)
        self.files: dict[int, DiskFile] = {}
        self.order: list[int] = []
        """Disk groups (by id) in the order the optimizer updates them each step: the reads ahead follow it."""
        self.free: list[torch.Tensor] = []
        self.slab_bytes = 0
        self.slab_free = threading.Condition()
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mtc-disk")
        self.reads: dict[int, tuple[Future, torch.Tensor]] = {}
        self.writes: dict[int, Future] = {}
        self.counted = threading.Lock()
        self.bytes_read = self.bytes_written = 0
        weakref.finalize(self, _close, self.io, self.files, self.root)

    def add(self, group) -> None:
        """A file for the group's state (zeros), and slabs large enough for it."""
        self.drain()
        file = self.files[id(group)] = DiskFile(os.path.join(self.root, f"{group.name}.bin"), group.disk_names,
                                                group.length)
        if file.nbytes > self.slab_bytes:
            self.slab_bytes = file.nbytes
            self.free = [aligned_empty(file.nbytes) for _ in range(SLABS)]

    def remove(self, group) -> None:
        self.drain()
        file = self.files.pop(id(group))
        file.close()
        os.unlink(file.path)
        self.order = [key for key in self.order if key != id(group)]

    def set_order(self, groups: list) -> None:
        self.drain()
        self.order = [id(g) for g in groups]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    # -- the optimizer's path -------------------------------------------------------------------------
    def update(self, group, work) -> None:
        """On the optimizer thread: run work() (the group's AdamW) with the group's disk state bound to a slab
        read ahead, then write it back on an I/O thread and read the next disk group ahead."""
        key = id(group)
        if key not in self.reads:
            self._read_ahead(key)
        future, slab = self.reads.pop(key)
        try:
            future.result()
            group.bind(self.files[key].views(slab))
            work()
        except BaseException:  # the file keeps the state from before the update; the slab goes back
            self._give_back(slab)
            raise
        finally:
            group.bind(None)
        self.writes[key] = self.io.submit(self._write_back, key, slab)
        if key in self.order:
            self._read_ahead(self.order[(self.order.index(key) + 1) % len(self.order)])

    def _read_ahead(self, key: int) -> None:
        if key in self.reads:
            return
        slab = self._take_slab()
        written = self.writes.get(key)  # the group's last write lands before it is read again
        self.reads[key] = (self.io.submit(self._read, key, slab, written), slab)

    def _read(self, key: int, slab: torch.Tensor, written: Future | None) -> None:
        if written is not None:
            written.result()
        self.files[key].read(slab)
        with self.counted:
            self.bytes_read += self.files[key].nbytes

    def _write_back(self, key: int, slab: torch.Tensor) -> None:
        try:
            self.files[key].write(slab)
            with self.counted:
                self.bytes_written += self.files[key].nbytes
        finally:
            self._give_back(slab)

    def _give_back(self, slab: torch.Tensor) -> None:
        with self.slab_free:
            self.free.append(slab)
            self.slab_free.notify()

    def _take_slab(self) -> torch.Tensor:
        with self.slab_free:
            self.slab_free.wait_for(lambda: self.free)
            return self.free.pop()

    def flush(self) -> None:
        """Wait for every write issued so far."""
        writes, self.writes = self.writes, {}
        for future in writes.values():
            future.result()

    def drain(self) -> None:
        """Wait for every write, drop the reads ahead (what they read may be rewritten by the caller)."""
        for future, slab in self.reads.values():
            future.result()
            self._give_back(slab)
        self.reads.clear()
        self.flush()

    # -- everyone else's path ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def state(self, group, write: bool = False):
        """The group's disk state as fp32 tensors in RAM ({name: tensor}); written back on exit if `write`.
        The optimizer thread must be idle (the caller has synchronised). It uses one of the optimizer's slabs, idle
        then: the host holds no more than the plan counted."""
        self.drain()
        file = self.files[id(group)]
        slab = self._take_slab()
        try:
            file.read(slab)
            yield file.views(slab)
            if write:
                file.write(slab)
        finally:
            self._give_back(slab)


def _close(io: ThreadPoolExecutor, files: dict, root: str) -> None:
    """The tier's end (with the store, or at exit): writes finish, the files go."""
    io.shutdown(wait=True)
    for file in files.values():
        file.close()
    shutil.rmtree(root, ignore_errors=True)


def _remove_leftovers(directory: str) -> None:
    """State directories of runs that were killed (named by their pid; a live process's stay)."""
    for name in os.listdir(directory):
        if name.startswith(".mtc-state-") and name[len(".mtc-state-"):].isdigit():
            pid = int(name[len(".mtc-state-"):])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            except PermissionError:
                pass


def disk_rates(directory: str, nbytes: int = 1 << 30) -> tuple[float, float, bool]:
    """(read, write) bytes a second of the directory's disk as the tier uses it (O_DIRECT where it can, IO_CHUNK
    pieces, one file), and whether O_DIRECT held. The file is removed afterwards."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f".mtc-probe-{os.getpid()}.bin")
    file = DiskFile(path, ("data",), nbytes // 4)
    slab = aligned_empty(file.nbytes)
    slab.random_(0, 256)  # not zeros: some filesystems and drives store those for free
    try:
        started = time.perf_counter()
        file.write(slab)
        os.fsync(file.fd)
        written = time.perf_counter() - started
        started = time.perf_counter()
        file.read(slab)
        read = time.perf_counter() - started
        return file.nbytes / read, file.nbytes / written, file.direct
    finally:
        file.close()
        os.unlink(path)
