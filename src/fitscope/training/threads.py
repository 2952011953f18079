"""``trainer.num_threads=auto``: the torch threads of one training process.

``OMP_NUM_THREADS`` when it is set (joblib's loky workers get ``cores // n_jobs`` and Ray
workers their task's ``num_cpus`` that way), else the launcher's ``cpus_per_task``
(submitit, whose local jobs run side by side unbounded), else every core this process
may run on (its CPU affinity: a SLURM allocation, a container's cpuset), divided among
the processes of the run (``ddp_spawn``). A DVC train stage runs ``study.jobs`` at once
through joblib, so each of its runs gets ``cores // jobs`` threads. Several stages started
side by side by hand (``dvc queue start -j 2``) should set ``OMP_NUM_THREADS`` or
``trainer.num_threads`` and ``study.jobs=1``: OpenMP threads on
more cores than exist are much slower than one thread each (docs/benchmarks.md).
The run records the number it used (tag ``fitscope.num_threads``, metrics.json).
"""

from __future__ import annotations

import os

AUTO = "auto"
# Set by a sweep started with OMP_NUM_THREADS (a cap its user chose, e.g. two queued DVC
# experiments side by side): its jobs then keep their threads, no idle-core hand-over.
THREADS_FIXED_ENV = "FITSCOPE_THREADS_FIXED"


def usable_cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_threads(value: int | str, processes: int = 1, cpus: int | None = None) -> int:
    """The torch threads each of a run's ``processes`` uses: ``value``, or ``auto``'s choice
    (``cpus``: what the launcher gives the job, if it says)."""
    if value != AUTO:
        return int(value)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, (cpus or usable_cpus()) // processes)


def shared_threads(cores: int, at_once: int, remaining: int, current: int) -> int:
    """The torch threads a sweep job may use once fewer than ``at_once`` jobs remain of a
    sweep that runs ``at_once`` side by side on ``cores``: the idle cores' share, and
    never fewer than it has (``current``)."""
    running = max(1, min(at_once, remaining))
    return max(current, cores // running)
