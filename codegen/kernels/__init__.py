"""Triton kernels for the block patterns eager PyTorch runs in many passes over memory: one per file,
each with its forward and backward kernels, launchers, an autograd Function and the eager reference it
replaces."""
