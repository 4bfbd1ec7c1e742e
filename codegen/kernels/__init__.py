"""Triton kernels for the block patterns eager PyTorch runs in many passes over memory: one per file,
each with its forward and backward kernels, launchers, an autograd Function and the eager reference it
replaces."""


def launches(tensor) -> bool:
    """Whether a kernel runs on `tensor`: it holds elements and real memory (the planner runs blocks on the
    meta device, where only the outputs' shapes and dtypes matter)."""
    return tensor.numel() > 0 and not tensor.is_meta
