"""Plan: what mtc.compile decided, printable and saved as JSON (`mtc show plan.json`)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from mtc.codegen.stream_plan import SHARED, StreamPlan, busy_seconds, duration, predicted_step_seconds
from mtc.config import HardwareProfile, format_bytes
from mtc.runtime.store import FIXED_HOST_BYTES

FORMAT = "mtc-plan/4"


@dataclass
class Plan:
    header: dict
    """Model, tracer, device, dtype, gpu_mem, the block chain, the profile and each pass's seconds."""
    templates: dict[str, list[str]]
    """Template name -> the stages that share it."""
    stream_plan: StreamPlan

    @property
    def schedule(self):
        return self.stream_plan.schedule

    @property
    def profile(self) -> HardwareProfile:
        """The hardware profile the plan was made for."""
        return HardwareProfile.from_json(self.header["profile"])

    def predicted_step_seconds(self) -> float:
        return predicted_step_seconds(self.stream_plan, self.profile)

    def to_json(self) -> dict:
        return {"format": FORMAT, "header": self.header, "templates": self.templates,
                "stream_plan": self.stream_plan.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("format") != FORMAT:
            raise ValueError(f"not an mtc plan: format is {data.get('format')!r}, expected {FORMAT!r}")
        return cls(data["header"], data["templates"], StreamPlan.from_json(data["stream_plan"]))

    def save(self, path) -> None:
        """Write atomically: a crash mid-write leaves any earlier file at `path` intact."""
        directory = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(f.name, path)

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def summary(self) -> str:
        h, schedule = self.header, self.schedule
        profile = self.profile
        stages = schedule.stages + ([schedule.shared] if schedule.shared else [])
        params = sum(s.params for s in stages)
        busy = busy_seconds(self.stream_plan, profile)
        bound = max(busy.values())
        lines = [
            f"mtc plan · {h['model']} · traced by {h['tracer']} · {h['device']} {h['compute_dtype']} · "
            f"gpu_mem {format_bytes(schedule.gpu_mem)}",
            "passes: " + ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in h["passes"].items()),
            f"{params:,} parameters in {len(schedule.stages)} stages; blocks: {h['chain']}",
        ]
        if h.get("kernels"):  # what the kernel patterns replaced, when kernels= asked for them
            lines.append("kernels: " + "; ".join(f"{template} " + ", ".join(f"{name} x{n}" for name, n in used.items())
                                                 for template, used in h["kernels"].items()))
        lines += [
            stage_table(stages, self.stream_plan, profile),
        ]
        lines += [
            f"schedule: {len(schedule.stages) - len(schedule.resident)} stages stream through {schedule.slots} "
            f"weight slots of {format_bytes(schedule.slot_bytes)} (AdamW on the host); "
            f"{len(schedule.resident)} resident {_ranges(schedule.resident)} (AdamW on the device); "
            f"{format_bytes(schedule.resident_bytes)} on the device all step"
            f"{'; updates wait for the global gradient norm' if schedule.clip else ''}",
            f"activations: {len(schedule.keep) + 1} stages keep theirs for the backward {_ranges(schedule.keep)} "
            f"and the last; {len(schedule.offload)} offload their input to the host{_ranges(schedule.offload, ' ')}; "
            f"{len(schedule.stages) - len(schedule.keep) - len(schedule.offload) - 1} recompute from their input"
            + _chunks_line(schedule),
            _row_check_line(schedule, h.get("not_chunkable", {})),
            _tiles_line(schedule, h.get("tails", {}), h.get("no_tail", {})),
            f"device peak {format_bytes(schedule.peak_bytes)} of {format_bytes(schedule.gpu_mem)}",
            *([f"data parallel: {schedule.ranks} ranks, each on its rows of the batch; a streamed stage's copies move "
               f"1/{schedule.ranks} of its bytes over PCIe and all-gather (in) or reduce-scatter (out) the rest "
               f"between the GPUs at {(profile.link_bytes_per_s or profile.h2d_bytes_per_s) / 1e9:g} GB/s; each host "
               f"keeps and updates 1/{schedule.ranks} of the training state; resident stages' gradients are "
               f"all-reduced"]
              if schedule.ranks > 1 else []),
            f"per step: {format_bytes(sum(i.bytes for i in self.stream_plan.on('h2d')))} in, "
            f"{format_bytes(sum(i.bytes for i in self.stream_plan.on('d2h')))} out; profile '{profile.name}' "
            f"({profile.source})" if profile.source else f"profile '{profile.name}'",
            *([f"disk: {len(schedule.disk)} stages {_ranges(schedule.disk)} keep their optimizer state in files "
               f"({format_bytes(h['disk_bytes'])}), read and written back around each host update: "
               f"{format_bytes(h['disk_bytes'])} read and written a step, "
               f"{h['disk_bytes'] * 86400 / self.predicted_step_seconds() / 1e12:.1f} TB written a day at the "
               f"predicted step (the drive's wear); disk at {profile.disk_read_bytes_per_s / 1e9:g} GB/s read, "
               f"{profile.disk_write_bytes_per_s / 1e9:g} GB/s write"] if schedule.disk else []),
            f"host: {format_bytes(h['host_bytes'])} for the training state"
            + (f" on each of the {schedule.ranks} ranks" if schedule.ranks > 1 else "")
            + (f" of {format_bytes(h['host_mem'])} host RAM" if h.get("host_mem") else "")
            + f", plus the process (about {format_bytes(FIXED_HOST_BYTES)})",
            f"predicted TFLOP/s: {3 * sum(s.forward_flops for s in stages) / self.predicted_step_seconds() / 1e12:.0f} "
            f"(forward and backward FLOPs counted, recompute not)",
            "busy per lane: " + ", ".join(f"{lane} {seconds:.4g} s" for lane, seconds in busy.items())
            + f"; predicted / lower bound: {self.predicted_step_seconds() / max(bound, 1e-12):.2f}",
            f"predicted step: {self.predicted_step_seconds():.4g} s",
            f"lower bound: {bound:.4g} s",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n\n" + str(self.stream_plan)


def _row_check_line(schedule, not_chunkable: dict) -> str:
    """Which stages could run in token chunks, and the first reason each template of the others gives."""
    can = sum(s.rows > 1 for s in schedule.stages)
    reasons = {}
    for name, why in not_chunkable.items():
        template = next(s.template for s in schedule.stages if s.name == name)
        reasons.setdefault(template, f"{name}: {why}")
    text = f"token chunks: {can} of {len(schedule.stages)} stages could run in them"
    return text + (f"; not {'; '.join(reasons.values())}" if reasons else "")


def _tiles_line(schedule, tails: dict, no_tail: dict) -> str:
    """Which stages run what follows their attention in token tiles; each template's tail, or why it has none."""
    tiled = [i for i in range(len(schedule.stages)) if schedule.tiled(i)]
    if not tails:
        reasons = "; ".join(f"{template}: {why}" for template, why in no_tail.items())
        return f"token tiles: none ({reasons})" if reasons else "token tiles: none"
    described = "; ".join(f"{template} ({text})" for template, text in tails.items())
    if not tiled:
        return (f"token tiles: none at this shape (tiles of at most {schedule.tile_tokens} tokens lower no "
                f"recomputed or offloaded stage's working set); could tile: {described}")
    tiles = schedule.stages[tiled[0]].tiles
    return (f"token tiles: {len(tiled)} stages run the part after their attention in {tiles} tiles of at most "
            f"{schedule.tile_tokens} tokens {_ranges(tiled)} (marked ~{tiles}); {described}")


def _chunks_line(schedule) -> str:
    chunked = schedule.chunked()
    if not chunked:
        return ""
    return (f"; {len(chunked)} run in {schedule.chunks} token chunks of {schedule.rows_per_chunk()} of the "
            f"batch's {schedule.stages[chunked[0]].rows} rows {_ranges(chunked)} (marked /{schedule.chunks})")


def _ranges(indices: list[int], before: str = "") -> str:
    """[0, 1, 2, 5] -> '(stages 0-2, 5)' (after `before`); [] -> ''."""
    runs = []
    for index in indices:
        if runs and runs[-1][1] == index - 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"{before}(stages {text})" if runs else ""


def stage_table(stages, stream_plan=None, profile=None) -> str:
    """One line per stage: parameters, weight bytes, bytes kept, working sets and FLOPs; with a plan also
    where the stage lives, the bytes it moves a step and its predicted compute and update times."""
    header = (f"{'stage':<18}{'template':<16}{'params':>14}{'weights':>12}{'kept in':>12}{'fwd work':>12}"
              f"{'bwd work':>12}{'fwd GFLOP':>11}")
    if stream_plan is not None:
        header += f"  {'weights':<13}{'activations':<12}{'in/step':>12}{'out/step':>12}{'fwd ms':>9}{'bwd ms':>9}{'AdamW ms':>10}"
    lines = [header]
    for index, s in enumerate(stages):
        tiled = stream_plan is not None and s.name != "shared" and stream_plan.schedule.tiled(index)
        work = (s.tiled_forward_bytes, s.tiled_backward_bytes) if tiled else (s.forward_bytes, s.backward_bytes)
        line = (f"{s.name:<18}{s.template:<16}{s.params:>14,}{format_bytes(s.weight_bytes):>12}"
                f"{format_bytes(s.saved_bytes):>12}{format_bytes(work[0]):>12}"
                f"{format_bytes(work[1]):>12}{s.forward_flops / 1e9:>11.1f}")
        if stream_plan is not None:
            line += "  " + _stage_plan(stream_plan, profile, SHARED if s.name == "shared" else index)
        lines.append(line)
    return "\n".join(lines)


def _stage_plan(stream_plan, profile, stage: int) -> str:
    mine = [i for i in stream_plan.instrs if i.stage == stage]

    def total(ops, unit=1e3):
        return sum(duration(stream_plan, i, profile) for i in mine if i.op in ops) * unit

    resident = stage in stream_plan.schedule.resident
    update = next((i for i in mine if i.op == "optimizer"), None)
    where = "resident" if resident else ("shared" if stage == SHARED else "streamed")
    where += "" if update is None else ("/gpu" if update.stream == "compute" else "/cpu")
    moved_in = sum(i.bytes for i in mine if i.op in ("copy_in", "fetch"))
    moved_out = sum(i.bytes for i in mine if i.op in ("copy_out", "offload"))
    activations = stream_plan.schedule.policy(stage) if stage != SHARED else "-"
    if stage != SHARED and stream_plan.schedule.chunks_of(stage) > 1:
        activations += f"/{stream_plan.schedule.chunks_of(stage)}"  # in that many token chunks
    if stage != SHARED and stream_plan.schedule.tiled(stage):
        activations += f"~{stream_plan.schedule.stages[stage].tiles}"  # its tail in that many token tiles
    return (f"{where:<13}{activations:<12}{format_bytes(moved_in) if moved_in else '-':>12}{format_bytes(moved_out) if moved_out else '-':>12}"
            f"{total(('forward',)):>9.1f}{total(('loss', 'backward')):>9.1f}{total(('optimizer',)):>10.1f}")
