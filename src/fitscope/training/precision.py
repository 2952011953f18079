"""``trainer.precision=auto``: bf16-mixed where the hardware computes bf16 natively, else fp32.

Resolved once per run, here; the run records the result (MLflow tag ``fitscope.precision``,
``precision`` in metrics.json, the report's precision column).
"""

from __future__ import annotations

import torch

AUTO = "auto"
FP32 = "32-true"
BF16 = "bf16-mixed"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bf16 matmuls are emulated and much slower than fp32
    (16x on an AVX2-only EPYC, docs/benchmarks.md)."""
    cpu = torch.cpu
    # Private helpers of torch.cpu (there since torch 2.1): absent means unknown, i.e. no.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice lands on a CUDA GPU."""
    return accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())


def native_bf16(accelerator: str) -> bool:
    """Whether ``accelerator`` (cpu | gpu | auto) runs bf16 natively on this machine."""
    if uses_gpu(accelerator):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision a run uses: ``auto`` becomes bf16-mixed or 32-true."""
    if precision != AUTO:
        return precision
    return BF16 if native_bf16(accelerator) else FP32
