"""Failures that decide what happens to a worker or an input: the device faults after which a worker must end
(Ray restarts its actor on a fresh device context and retries its batch), and the one way an exception is told
in a manifest reason."""

from __future__ import annotations

import os
import sys

DEVICE_FAULT_EXIT_CODE = 75


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message``, cut to ``limit`` characters: how an exception is told in a manifest reason."""
    return f"{type(exc).__name__}: {exc}"[:limit]


class DeviceFault(RuntimeError):
    """The accelerator is gone or corrupted (illegal address, ECC error, lost device). Every later face on
    this process would fail too, or fall back to blur unnoticed: the actor must end so Ray restarts it."""


# Messages of CUDA errors after which a process cannot use its device again (torch, cuBLAS/cuDNN,
# onnxruntime's CUDA provider). Out-of-memory is not one of them: it is retried one face at a time.
_DEVICE_FAULT_MARKERS = ("cuda error", "cuda failure", "cublas_status_execution_failed",
                         "cublas_status_internal_error", "cudnn_status_execution_failed",
                         "cudnn_status_internal_error", "cudnn_status_mapping_error", "cudaerror",
                         "illegal memory access", "device-side assert", "ecc error", "unspecified launch failure",
                         "misaligned address", "device lost", "no cuda-capable device", "nccl error")


def _may_carry_device_fault(exc: BaseException) -> bool:
    """Whether ``exc``'s type is one a device error arrives as: torch's (RuntimeError and its subclasses, such as
    torch.AcceleratorError; dlib's CUDA errors are RuntimeErrors too) or onnxruntime's own error types. Only these
    are read for the markers: a ValueError or an OSError is never a device fault, whatever text (a path, a table
    cell) its message holds."""
    return isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")


def is_device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the device is gone: by type first (a
    ``DeviceFault`` is one; out-of-memory never is: it is retried one face at a time), then, for the types a device
    error arrives as, by the CUDA markers in its whole message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DeviceFault):
            return True
        msg = str(exc).lower()
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in msg or "alloc_failed" in msg
        if not oom and _may_carry_device_fault(exc) and any(m in msg for m in _DEVICE_FAULT_MARKERS):
            return True
        exc = exc.__cause__
    return False


def raise_if_device_fault(exc: BaseException) -> None:
    if isinstance(exc, DeviceFault):
        raise exc
    if is_device_fault(exc):
        raise DeviceFault(f"device fault, this worker must restart: {describe(exc)}") from exc


def end_worker(exc: BaseException) -> None:
    """End this worker process at once: Ray restarts the actor (a fresh CUDA context) and retries its batch
    (``ray.max_task_retries``). Raising instead would fail the batch as a user error, not restart anything."""
    print(f"rp-distributed: {exc}; ending this worker so Ray restarts it", file=sys.stderr, flush=True)
    os._exit(DEVICE_FAULT_EXIT_CODE)
