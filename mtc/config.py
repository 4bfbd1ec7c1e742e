"""Typed configuration: sizes, the optimizer and the hardware profile the planner scores against."""
from __future__ import annotations

import numbers
import re
import sys
from dataclasses import asdict, dataclass

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# ASCII only: with Unicode case folding the Kelvin sign matched "K" and then named no unit.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE | re.ASCII)
MAX_BYTES = 2**63 - 1
"""The largest size parse_bytes gives: an int64, as torch holds sizes (a float of more would not stay exact)."""


def parse_bytes(value, name: str = "gpu_mem") -> int:
    """'80GB' (10^9), '24GiB' (2^30), '512MB' or an int of bytes -> bytes > 0."""
    accepted = "a positive int of bytes or a string like '80GB', '24GiB', '512MB'"
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size; expected {accepted}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    else:
        raise ValueError(f"{name}={value!r} is not a size; expected {accepted}")
    if size > MAX_BYTES:
        raise ValueError(f"{name}={value!r} is more than 2**63 - 1 bytes; expected {accepted}")
    if int(size) <= 0:
        raise ValueError(f"{name}={value!r} must be more than 0 bytes; expected {accepted}")
    return int(size)


def is_finite_number(value) -> bool:
    """A real number that is not a bool and that a float holds finitely: not NaN, not inf, no int past 1.8e308."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def parse_batch(text: str, flag: str = "--batch") -> tuple[int, int]:
    """'4x4096' -> (sequences, tokens per sequence), both > 0."""
    try:
        sequences, tokens = (int(part) for part in text.lower().split("x"))
        if sequences > 0 and tokens > 0:
            return sequences, tokens
    except ValueError:
        pass
    raise ValueError(f"{flag}={text!r} is not valid; expected SEQUENCESxTOKENS with both > 0, e.g. 4x4096")


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class AdamW:
    """AdamW with decoupled weight decay, the same update as torch.optim.AdamW."""

    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to every parameter."""

    def __post_init__(self):
        def non_negative(value):
            return is_finite_number(value) and value >= 0

        checks = [("lr", self.lr, non_negative(self.lr), "a finite number >= 0"),
                  ("eps", self.eps, non_negative(self.eps), "a finite number >= 0"),
                  ("weight_decay", self.weight_decay, non_negative(self.weight_decay), "a finite number >= 0"),
                  ("betas", self.betas, isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                   and all(non_negative(b) and b < 1 for b in self.betas), "two numbers in [0, 1)")]
        for name, value, ok, accepted in checks:
            if not ok:
                raise ValueError(f"AdamW {name}={value!r} is not valid; expected {accepted}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


OPTIMIZER_CHUNK = 1 << 22
"""Elements per optimizer pass (16 MiB of fp32 per buffer). Small enough that a chunk's gradient and
weights are still in the CPU's last-level cache when the next pass reads them; large enough that the
three op launches per chunk (~20 us each) are noise against the ~1 ms a chunk's update takes at
4 G params/s. The GPU update uses it too, so its fp32 scratch stays small."""


@dataclass(frozen=True)
class HardwareProfile:
    """Rates the planner simulates a step with. Copy and optimizer rates are the *contended* ones: what
    each lane gets while the others run (host memory bandwidth is shared)."""

    name: str
    h2d_bytes_per_s: float
    """Pinned host-to-device copy rate."""
    d2h_bytes_per_s: float
    """Pinned device-to-host copy rate."""
    flops_per_s: float
    """Sustained matrix-multiply rate in the compute dtype."""
    optimizer_params_per_s: float
    """CPU AdamW rate while copies and GEMMs run beside it."""
    gpu_optimizer_params_per_s: float
    """AdamW rate on the device for resident stages (bf16 gradient widened, fp32 state, bf16 weights out)."""
    host_bytes: int = 0
    """Host RAM (0: unknown)."""
    link_bytes_per_s: float = 0.0
    """Data parallel: the rate one GPU all-gathers or reduce-scatters at with the others of its host (bytes that
    cross to or from the others, a second). 0: unknown, taken as h2d_bytes_per_s (peers over PCIe)."""
    disk_read_bytes_per_s: float = 2.0e9
    """The nvme directory's read rate (optimizer state of disk stages). Default: a PCIe 4 NVMe drive's order of
    magnitude, not measured; `mtc probe --nvme DIR` measures the directory."""
    disk_write_bytes_per_s: float = 1.5e9
    """Its write rate (as disk_read_bytes_per_s)."""
    source: str = ""
    """Where the numbers come from: a probe (machine, date) or the measurements and specs they rest on."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HardwareProfile":
        return cls(**data)


NVLINK4_BYTES_PER_S = 360e9
"""Not measured here (no machine of several GPUs was lent): NVLink 4 carries 450 GB/s a direction per H100/H200
SXM (NVIDIA's 900 GB/s total), and NCCL's all-gather reaches about 80% of it."""
# The rates steps reached on the H100 machines (80GB HBM3, PCIe 5, 16 cores), from traced steps in the
# BENCHMARKS.md runs of 2026-11-22: compute with the Triton kernels in place (the default on a GPU) at 535
# TFLOP/s in 3B 4x4096 steps and 584 in 8B ones (without them 403 and 482: norms, rotary and the
# 128k-vocabulary loss ran far below the GEMM rate), taken between; copies 40-52 GB/s while copying, the low
# end with the host optimizer busy beside them; host AdamW 2.1-2.4 G params/s with 12 threads; the
# embedding's device AdamW 33 G params/s. DESIGN.md's contended copy rate (34.5 GB/s) and GEMM rate (675
# TFLOP/s) were measured apart from a training step, and predicted eager steps 1.2-1.7x too fast.
H100 = HardwareProfile(
    "h100", h2d_bytes_per_s=42e9, d2h_bytes_per_s=41e9, flops_per_s=550e12, optimizer_params_per_s=2.2e9,
    gpu_optimizer_params_per_s=33e9, host_bytes=126 << 30, link_bytes_per_s=NVLINK4_BYTES_PER_S,
    source="H100 80GB HBM3 on PCIe 5, 16 cores: lane rates of traced 3B, 8B and 12B steps, compute with the Triton "
           "kernels (BENCHMARKS.md, 2026-11-22)")
# The rates steps reached on the H200 machines (141 GB, PCIe 5, 16 cores), calibrated in-step in the
# BENCHMARKS.md runs of 2026-11-22: compute with the Triton kernels in place (the default on a GPU) at 566
# TFLOP/s in 3B 4x4096 steps and 590 in 8B ones (without them 433 and 501), taken between.
H200 = HardwareProfile(
    "h200", h2d_bytes_per_s=50e9, d2h_bytes_per_s=51e9, flops_per_s=575e12, optimizer_params_per_s=2.0e9,
    gpu_optimizer_params_per_s=39e9, host_bytes=126 << 30, link_bytes_per_s=NVLINK4_BYTES_PER_S,
    source="H200 141GB on PCIe 5, 16 cores: lane rates of traced 3B and 8B steps, compute with the Triton kernels "
           "(BENCHMARKS.md, 2026-11-22)")
# Not measured here: PCIe 4 x16 carries ~25 GB/s pinned one way, less with both ways and AdamW beside it;
# 312 TFLOP/s bf16 dense peak, ~80% sustained; HBM2e 2 TB/s.
A100 = HardwareProfile(
    "a100", h2d_bytes_per_s=20e9, d2h_bytes_per_s=20e9, flops_per_s=250e12, optimizer_params_per_s=2.9e9,
    gpu_optimizer_params_per_s=33e9, source="spec-derived (PCIe 4, 312 TFLOP/s bf16, 2 TB/s); not measured")
# Not measured here: PCIe 4 x16; 165 TFLOP/s bf16 dense with fp32 accumulation (what torch uses), ~85%
# sustained; GDDR6X 1 TB/s; a desktop host (fewer memory channels) for the CPU AdamW.
RTX4090 = HardwareProfile(
    "rtx4090", h2d_bytes_per_s=20e9, d2h_bytes_per_s=20e9, flops_per_s=140e12, optimizer_params_per_s=1.5e9,
    gpu_optimizer_params_per_s=17e9, source="spec-derived (PCIe 4, 165 TFLOP/s bf16, 1 TB/s); not measured")
# A 2-core CI machine, order-of-magnitude only: the CPU engine runs the same plan in order.
CPU = HardwareProfile("cpu", h2d_bytes_per_s=5e9, d2h_bytes_per_s=5e9, flops_per_s=50e9,
                      optimizer_params_per_s=0.2e9, gpu_optimizer_params_per_s=0.2e9, link_bytes_per_s=2e9,
                      source="order of magnitude for a small CPU machine")
PROFILES = {profile.name: profile for profile in (H100, H200, A100, RTX4090, CPU)}
