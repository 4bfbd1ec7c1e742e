"""mtc: train models whose training state is far larger than the GPU, on one GPU.

    step = mtc.compile(model, gpu_mem="80GB", example=(input_ids, labels), optimizer=mtc.AdamW(lr=3e-4))
    loss = step(input_ids, labels)
"""
from mtc.checkpoint import CheckpointError, from_pretrained, load, save
from mtc.compile import Step, compile, plan
from mtc.config import AdamW, parse_bytes
from mtc.plan import Plan
from mtc.runtime.engine import NonFiniteError

__all__ = ["AdamW", "CheckpointError", "NonFiniteError", "Plan", "Step", "compile", "from_pretrained", "load",
           "parse_bytes", "plan", "save"]
__version__ = "0.1.0"
