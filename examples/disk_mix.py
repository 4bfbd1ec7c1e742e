"""The disk's rates as the NVMe tier loads it: reads alone, writes alone, and both at once (the tier reads the
next stage's state ahead while it writes the last one back, on two threads).

    python -m mtc.examples.disk_mix /path/on/nvme --json out.json

The plan times a disk stage's update as its bytes read at the read rate plus written at the write rate; when
reads and writes share the drive, each direction gets about 1 / (1/read + 1/write) of it, which this checks.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

from mtc.runtime.disk import DiskFile, aligned_empty, disk_rates


def both_at_once(directory: str, nbytes: int) -> dict:
    """Read one file while writing another of nbytes each, on two threads: each one's rate and the two together."""
    reading, writing = (DiskFile(os.path.join(directory, f".mtc-mix-{os.getpid()}-{name}.bin"), ("data",), nbytes // 4)
                        for name in ("read", "write"))
    try:
        slabs = [aligned_empty(f.nbytes) for f in (reading, writing)]
        for slab, file in zip(slabs, (reading, writing)):
            slab.random_(0, 256)  # not zeros: some drives store those for free
            file.write(slab)
        seconds = {}

        def timed(name, call, slab):
            started = time.perf_counter()
            call(slab)
            seconds[name] = time.perf_counter() - started

        started = time.perf_counter()
        threads = [threading.Thread(target=timed, args=("read", reading.read, slabs[0])),
                   threading.Thread(target=timed, args=("write", writing.write, slabs[1]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        return {"read": reading.nbytes / seconds["read"], "write": writing.nbytes / seconds["write"],
                "together": (reading.nbytes + writing.nbytes) / wall}
    finally:
        for file in (reading, writing):
            file.close()
            os.unlink(file.path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--gib", type=float, default=4.0, help="bytes per file, in GiB (default 4)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    nbytes = int(args.gib * 2**30) // 4096 * 4096
    read, write, direct = disk_rates(args.directory, nbytes)
    result = {"alone": {"read": read, "write": write}, "o_direct": direct,
              "both_at_once": both_at_once(args.directory, nbytes), "model": 1 / (1 / read + 1 / write)}
    both = result["both_at_once"]
    print(f"{args.directory} ({'O_DIRECT' if direct else 'page cache'}, {args.gib:g} GiB files): alone read "
          f"{read / 1e9:.2f} GB/s, write {write / 1e9:.2f} GB/s; at once read {both['read'] / 1e9:.2f}, write "
          f"{both['write'] / 1e9:.2f}, together {both['together'] / 1e9:.2f} GB/s; the plan's model gives each "
          f"direction {result['model'] / 1e9:.2f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
