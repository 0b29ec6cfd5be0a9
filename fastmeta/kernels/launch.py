"""Triton launches on the inputs' device.

A Triton launch goes to the current CUDA device and its current stream, whatever
device the tensors are on: with current device 0, a wrapper called on cuda:1 tensors
would launch its kernels on GPU 0. Every public wrapper in fastmeta.kernels is
decorated with `launches_on_input_device`, which makes its first argument's device
current (and so its current stream) for the whole wrapper.
"""

import functools

import torch


def on_device(tensor: torch.Tensor) -> torch.cuda.device:
    """A context making `tensor`'s CUDA device current (torch.cuda.device_of); it does
    nothing for CPU tensors (the Triton interpreter) and never initializes CUDA there."""
    return torch.cuda.device_of(tensor)


def launches_on_input_device(wrapper):
    """Decorator: runs `wrapper(first, ...)` inside on_device(first)."""

    @functools.wraps(wrapper)
    def guarded(first, *args, **kwargs):
        with on_device(first):
            return wrapper(first, *args, **kwargs)

    return guarded
