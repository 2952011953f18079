"""trainer.precision=auto: bf16-mixed exactly where the hardware has native bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitscope.errors import FitscopeError
from fitscope.precision import resolve_precision
from fitscope.schema import TrainerConfig


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (an independent reading: not torch's)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo has no flags line")


def expected_auto_precision(accelerator: str) -> str:
    """What auto must give on a CPU accelerator of this machine."""
    assert accelerator == "cpu", "GPU resolution is checked on a GPU machine (bench --gpu)"
    native = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    return "bf16-mixed" if native else "32-true"


def test_auto_follows_the_cpu_flags():
    assert resolve_precision("auto", "cpu") == expected_auto_precision("cpu")
    if not torch.cuda.is_available():  # accelerator=auto without a GPU is the CPU
        assert resolve_precision("auto", "auto") == expected_auto_precision("cpu")


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed"])
def test_an_explicit_precision_is_kept(explicit):
    assert resolve_precision(explicit, "cpu") == explicit


def test_schema_accepts_auto_and_refuses_unknown():
    fields = dict(accelerator="cpu", devices=1, max_epochs=1, num_threads=1, strategy="auto")
    assert TrainerConfig(**fields, precision="auto").precision == "auto"
    with pytest.raises(FitscopeError, match=r"trainer\.precision"):
        TrainerConfig(**fields, precision="bf16")
