"""One training job: validate the config, claim it in MLflow, fit, and end the run with
its outcome (FINISHED, FAILED or KILLED). Returns the objective (a finite float) for
Hydra sweepers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import check_writable_dir, write_json
from fitscope.core.progress import JOBS_DONE_FILE, SWEEP_JOBS_ENV
from fitscope.pipeline.claim import OpenedRun, checkpoint_dir, claim_or_resume, resume_point
from fitscope.pipeline.identity import run_config
from fitscope.pipeline.lifecycle import (
    RESUME_HINT,
    Interrupted,
    JobGuard,
    in_worker,
    received,
    signal_name,
)
from fitscope.pipeline.outputs import RESUME_RUN_FILE, write_outputs
from fitscope.pipeline.schema import TrainConfig, check
from fitscope.pipeline.search import pruned_tags, trial_feed
from fitscope.tracking.parents import close_parent
from fitscope.tracking.tags import config_hash
from fitscope.training.callbacks import InterruptWatch, ReportEpochs, ShareIdleCores
from fitscope.training.datamodule import ArrayDataModule
from fitscope.training.fit import checkpointing, fit_run
from fitscope.training.precision import resolve_precision
from fitscope.training.threads import (
    AUTO,
    THREADS_FIXED_ENV,
    resolve_num_threads,
    usable_cpus,
)

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> TrainConfig:
    """Refuse a bad composed config before any work starts (one clear error); return it
    typed (the schema's dataclasses), which the builders downstream take.

    The schema (fitscope.pipeline.schema) checks every key; this adds what depends on the
    machine, such as a GPU being there.
    """
    typed = check(cfg)
    if checkpointing(typed):  # found now, not at the first checkpoint 30 s into training
        check_writable_dir(typed.callbacks.checkpoint.dir, "callbacks.checkpoint.dir", create=False)
    if cfg.trainer.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise FitscopeError(
                f"trainer=gpu but torch {torch.__version__} sees no CUDA GPU. Fix: use "
                "trainer=cpu, or a machine with a GPU and a CUDA build of torch"
            )
    return typed


def train(cfg: DictConfig) -> float:
    """Train one variant; return the objective at the selected (best or last) epoch.

    With MLflow, the run first claims its config (``tracking.claims.claim_run``): a config
    that a live run holds, or that a FINISHED run has (unless ``force``), is skipped with
    one line. SIGINT/SIGTERM end the run KILLED and raise ``lifecycle.Interrupted``.
    """
    typed = validate(cfg)
    run_dir = Path(cfg.paths.run_dir)
    check_writable_dir(run_dir, "paths.run_dir")  # before training, not after it
    guard = JobGuard()
    watch = InterruptWatch(guard.check)
    # Lightning logs "Received SIGTERM" on its own stderr handler; the interrupt has one line.
    logging.getLogger("pytorch_lightning.trainer.connectors.signal_connector").setLevel(
        logging.WARNING
    )
    chash = config_hash(run_config(cfg))
    opened = OpenedRun(
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        num_threads=resolve_num_threads(cfg.trainer.num_threads, processes(cfg), launcher_cpus()),
    )
    try:
        with guard:
            value = _claim_and_fit(cfg, typed, guard, watch, opened, chash, run_dir)
            opened.outcome = "ok"
            return value
    except BaseException as exc:
        _fail(exc, opened, watch, checkpoint_dir(cfg, chash))
        raise
    finally:
        _close(cfg, opened)


def _datamodule(cfg: TrainConfig) -> ArrayDataModule:
    dm = ArrayDataModule(
        cfg.data.dir,
        task=cfg.data.task,
        batch_size=cfg.data.batch_size,
        train_size=cfg.data.train_size,
        augment_shift=cfg.regularization.augment_shift,
        seed=cfg.seed,
        chunk_rows=cfg.data.chunk_rows,
    )
    dm.setup()  # refuses a missing split with a one-line error
    return dm


def _claim_and_fit(
    cfg, typed: TrainConfig, guard, watch, opened: OpenedRun, chash: str, run_dir: Path
) -> float:
    """Claim the config (or skip it), resume or start its fit, and write what it leaves.
    ``cfg`` is the composed DictConfig (hashed, recorded); ``typed`` what builders take."""
    dm = _datamodule(typed)
    if cfg.logger.name == "mlflow":
        skipped = claim_or_resume(cfg, dm, guard, opened)
        if skipped is not None:
            return skipped
    # Training: an older run's metrics.json here (`fitscope train` again by hand) no longer
    # says done until this run writes its own.
    (run_dir / "metrics.json").unlink(missing_ok=True)
    ckpt_dir = checkpoint_dir(cfg, chash)
    # This process holds the config now: its checkpoint is ours to use or drop.
    if cfg.force:  # a forced re-run starts from scratch
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    with guard.shield():  # a signal waits until the run to continue is settled
        resume = resume_point(cfg, chash, ckpt_dir, opened)
    opened.fitting = True
    tracker = opened.tracker
    feed = trial_feed(cfg)  # a search trial reports its epochs (and may be pruned)
    reporter = [] if feed is None else [ReportEpochs(feed.report, cfg.objective)]
    if feed is not None and tracker is not None and tracker.run_id:
        feed.link_run(tracker.run_id)
    if tracker is not None and cfg.logger.system_metrics:
        resumed = resume.get("resume_from") is not None
        tracker.watch_system(cfg.logger.system_metrics_every_s, resumed=resumed)
    if tracker is not None and tracker.run_id and checkpointing(cfg):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(ckpt_dir / RESUME_RUN_FILE, {"run_id": tracker.run_id})
    result = fit_run(
        typed,
        dm,
        run_dir,
        sink=tracker,
        logged_through=resume.get("logged_through", -1),
        extra_callbacks=(watch, *idle_cores(cfg), *reporter),
        live_progress=False if in_worker() else None,  # sweep workers share a terminal
        ckpt_dir=ckpt_dir,
        precision=opened.precision,
        num_threads=opened.num_threads,
        resume_from=resume.get("resume_from"),
    )
    hardware = {
        "precision": opened.precision,
        "num_threads": opened.num_threads,
        "num_threads_at_end": result.threads_at_end,  # more, where idle cores were handed over
    }
    if feed is not None and feed.pruned_at is not None and tracker is not None:
        tracker.set_tags(pruned_tags(feed.pruned_at))
    value = write_outputs(cfg, dm, run_dir, tracker, result, hardware)
    if not cfg.callbacks.checkpoint.keep:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return value


def _fail(exc: BaseException, opened: OpenedRun, watch, ckpt_dir: Path) -> None:
    """End the run for ``exc``: KILLED on a signal (raising ``Interrupted``) or Ctrl-C,
    else FAILED with the reason; a failed fit's checkpoint goes (it would fail again)."""
    tracker = opened.tracker
    signum = received()
    if signum is not None:
        opened.outcome = "interrupted"
        where = "before training" if watch.epoch is None else f"at epoch {watch.epoch}"
        if tracker is not None:
            # A store too busy to take the status now (SQLite locked by a process that
            # was killed mid-write) must not turn the interrupt into a traceback: the
            # run then stays RUNNING with a dead owner, and the next command reconciles it.
            with warn_on_error("could not mark the run KILLED yet"):
                tracker.fail(f"interrupted ({signal_name(signum)}) {where}", "KILLED")
        raise Interrupted(signum, f"interrupted {where}; {RESUME_HINT}") from None
    if tracker is not None:
        interrupted = isinstance(exc, KeyboardInterrupt)
        tracker.fail(f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
    if opened.fitting and not isinstance(exc, KeyboardInterrupt):
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _close(cfg: DictConfig, opened: OpenedRun) -> None:
    """Say where a pending run waits, and close the parent run this run opened itself."""
    outcome = opened.outcome
    pending = opened.tracker is not None and opened.tracker.pending
    if pending:  # said last, where it is seen: nothing of it is on the server yet
        log.warning(
            "fitscope: run %s waits to be synced to %s (the server was unreachable): "
            "its record is in %s; when the server is back, run `fitscope runs sync`",
            cfg.variant,
            opened.tracker.record.data["tracking_uri"],
            opened.tracker.record.path,
        )
    if opened.own_parent is not None and not pending:  # the sync closes it otherwise
        with warn_on_error("could not close the parent run"):
            close_parent(
                opened.client,
                opened.own_parent,
                cfg.objective,
                interrupted=outcome == "interrupted",
                failed=outcome == "failed",
            )


def idle_cores(cfg: DictConfig) -> list[ShareIdleCores]:
    """The hand-over of idle cores to a job of a joblib sweep whose threads are ``auto``
    (a DVC train stage with ``study.jobs`` > 1): the last jobs use the cores the others
    left (docs/pipeline.md)."""
    if not HydraConfig.initialized() or processes(cfg) > 1 or cfg.trainer.num_threads != AUTO:
        return []
    if os.environ.get(THREADS_FIXED_ENV):  # the user capped the threads (OMP_NUM_THREADS)
        return []
    hc = HydraConfig.get()
    at_once, total = hc.launcher.get("n_jobs"), os.environ.get(SWEEP_JOBS_ENV, "")
    if "joblib" not in str(hc.launcher.get("_target_", "")) or not total.isdigit():
        return []
    if not isinstance(at_once, int) or at_once < 2:
        return []
    done_file = Path(hc.sweep.dir) / JOBS_DONE_FILE
    return [ShareIdleCores(done_file, int(total), at_once, usable_cpus())]


def processes(cfg: DictConfig) -> int:
    """The processes one run trains in: ``devices`` under ddp_spawn on CPUs, else one."""
    cpu = cfg.trainer.accelerator == "cpu"
    return cfg.trainer.devices if cpu and cfg.trainer.strategy == "ddp_spawn" else 1


def launcher_cpus() -> int | None:
    """The CPUs a sweep job's launcher allots it (submitit's ``cpus_per_task``), if any."""
    if not HydraConfig.initialized():
        return None
    cpus = HydraConfig.get().launcher.get("cpus_per_task")
    return cpus if isinstance(cpus, int) and cpus >= 1 else None


@contextlib.contextmanager
def warn_on_error(what: str) -> Iterator[None]:
    """Bookkeeping in a ``finally`` must not hide the outcome it follows."""
    try:
        yield
    except Exception as exc:
        log.warning("%s: %s", what, exc)
