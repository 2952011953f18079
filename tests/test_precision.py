"""What ``auto`` resolves to on this machine: trainer.precision (bf16-mixed exactly where the
hardware has native bf16) and trainer.num_threads (the cores a run may use)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fitscope.core.errors import FitscopeError
from fitscope.pipeline.schema import TrainerConfig
from fitscope.training.precision import resolve_precision
from fitscope.training.threads import resolve_num_threads


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


def test_auto_threads_follow_omp_then_the_launcher_then_the_affinity(monkeypatch):
    cores = len(os.sched_getaffinity(0))  # what the kernel lets this process use
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_num_threads("auto") == cores
    assert resolve_num_threads("auto", processes=2) == max(1, cores // 2)  # ddp_spawn
    assert resolve_num_threads("auto", cpus=1) == 1  # submitit's cpus_per_task
    assert resolve_num_threads(3) == 3  # an explicit number is kept
    # joblib's loky workers and Ray workers get OMP_NUM_THREADS; the user's value wins too.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_num_threads("auto") == 1
    assert resolve_num_threads("auto", cpus=4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not a count: ignored
    assert resolve_num_threads("auto") == cores


@pytest.mark.parametrize("bad", [0, -1, 1025, 1.5, "two", None, True])
def test_schema_refuses_a_thread_count_that_is_not_auto_or_1_to_1024(bad):
    fields = dict(accelerator="cpu", devices=1, max_epochs=1, precision="auto", strategy="auto")
    assert TrainerConfig(**fields, num_threads="auto").num_threads == "auto"
    assert TrainerConfig(**fields, num_threads=2).num_threads == 2
    with pytest.raises(FitscopeError, match=r"trainer\.num_threads=.* Fix: use auto or a whole"):
        TrainerConfig(**fields, num_threads=bad)
