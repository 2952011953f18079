"""Training entry point: ``python -m fitscope.train [overrides]`` (``-m`` for sweeps).

Compose config -> validate -> seed -> data -> model -> Lightning fit with early
stopping and best-weight restore -> outputs + MLflow run. Returns the objective
(a finite float) for Hydra sweepers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fitscope import schema
from fitscope.cluster import prepare_driver
from fitscope.errors import FitscopeError
from fitscope.fileio import atomic_path, check_writable_dir, write_json
from fitscope.progress import JOBS_DONE_FILE, LineProgress, job_done
from fitscope.sweeps import callback_errors_exit, is_search, validate_jobs, validate_run

log = logging.getLogger("fitscope.train")


def _conf_dir() -> str:
    """``./conf`` when run from a fitscope checkout, else the package's own checkout."""
    here = Path.cwd() / "conf"
    if (here / "train.yaml").is_file():
        return str(here)
    return str(Path(__file__).resolve().parents[2] / "conf")


def validate(cfg: DictConfig) -> None:
    """Refuse a bad composed config before any work starts (one clear error).

    The schema (fitscope.schema) checks every key; this adds what depends on the
    machine, such as a GPU being there.
    """
    schema.check(cfg)
    if cfg.trainer.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise FitscopeError(
                f"trainer=gpu but torch {torch.__version__} sees no CUDA GPU. Fix: use "
                "trainer=cpu, or a machine with a GPU and a CUDA build of torch"
            )


def _job_info() -> dict[str, str]:
    """Hydra sweep id / job number when running inside a multirun."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {}
    return {"fitscope.sweep_dir": str(hc.sweep.dir), "fitscope.job_num": str(hc.job.num)}


def _task_overrides() -> list[str]:
    """This job's own overrides (a sweep's jobs each have theirs), without Hydra's."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # composed outside @hydra.main (the tests, a notebook)
        return []
    return [o for o in task if not o.startswith(("hydra.", "hydra/"))]


def _entry() -> str:
    """What started this run, for ``mlflow.source.name``: the DVC stage or the console script."""
    stage = os.environ.get("DVC_STAGE")
    return f"dvc stage {stage}" if stage else "fitscope-train"


def parent_run_name(study: str, profile: str, commit: str) -> str:
    """``<study> · <profile> · <commit>``: one parent per study, profile and code version."""
    return f"{study} · {profile} · {commit[:7]}"


STUDY_COMPARE = (
    "Runs: the Training runs tab (MLflow 3 opens on its GenAI overview unless the Model "
    "training switch is on, or the address ends in ?workflowType=machine_learning). "
    "What to compare: each parent run (one per profile and commit) carries the study "
    "report and its comparison table; each variant's run says in its description and its "
    "`fitscope.verdict` tag whether it overfits, underfits or fits well, with `best/*` "
    "metrics at the selected (restored) epoch and `best/gap_loss` (val minus train loss). "
    "Charts: `train/*` against `val/*` per epoch; `learning_curves.png` draws both on one chart."
)


def study_description(cfg: DictConfig) -> str:
    """The MLflow experiment's description: the study (its preset says) and what to compare."""
    about = cfg.study_description or f"Ad hoc runs on {cfg.data.name} (study `{cfg.study}`)."
    return f"{about}\n\n{STUDY_COMPARE}"


def _run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without run-specific keys (what the config hash covers)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "force", "tracking", "progress", "progress_every_s", "study_description"):
        resolved.pop(key, None)
    # Where and how often checkpoints are written does not change what is trained.
    resolved.get("callbacks", {}).pop("checkpoint", None)
    if resolved.get("data", {}).get("chunk_rows", 0) is None:  # the default: hashes unchanged
        resolved["data"].pop("chunk_rows")
    return resolved


def train(cfg: DictConfig) -> float:
    """Train one variant; return the objective at the selected (best or last) epoch.

    With MLflow, the run first claims its config (``tracking.claim_run``): a config that a
    live run holds, or that a FINISHED run has (unless ``force``), is skipped with one line.
    SIGINT/SIGTERM end the run KILLED and raise ``lifecycle.Interrupted``.
    """
    validate(cfg)

    from fitscope import lifecycle, tracking
    from fitscope.datamodules import ArrayDataModule
    from fitscope.precision import resolve_precision
    from fitscope.threads import resolve_num_threads
    from fitscope.training import InterruptWatch

    run_dir = Path(cfg.paths.run_dir)
    check_writable_dir(run_dir, "paths.run_dir")  # before training, not after it
    guard = lifecycle.JobGuard()
    watch = InterruptWatch(guard.check)
    # Lightning logs "Received SIGTERM" on its own stderr handler; the interrupt has one line.
    logging.getLogger("pytorch_lightning.trainer.connectors.signal_connector").setLevel(
        logging.WARNING
    )
    chash = tracking.config_hash(_run_config(cfg))
    ckpt_dir = _checkpoint_dir(cfg, chash)
    opened = _Opened(
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        num_threads=resolve_num_threads(cfg.trainer.num_threads, _processes(cfg), _launcher_cpus()),
    )
    outcome = "failed"
    fitting = False  # set once training starts: only then can a failure spoil the checkpoint
    try:
        with guard:
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
            if cfg.logger.name == "mlflow":
                skipped = _claim(cfg, dm, guard, opened)
                if skipped is not None:
                    outcome = "ok"
                    return skipped
            # This process holds the config now: its checkpoint is ours to use or drop.
            if cfg.force:  # a forced re-run starts from scratch
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            with guard.shield():  # a signal waits until the run to continue is settled
                resume = _resume_point(cfg, chash, ckpt_dir, opened)
            fitting = True
            value = _fit(
                cfg,
                dm,
                run_dir,
                opened.tracker,
                [watch],
                ckpt_dir=ckpt_dir,
                precision=opened.precision,
                num_threads=opened.num_threads,
                **resume,
            )
            if not cfg.callbacks.checkpoint.keep:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            outcome = "ok"
            return value
    except BaseException as exc:
        tracker = opened.tracker
        signum = lifecycle.received()
        if signum is not None:
            outcome = "interrupted"
            where = "before training" if watch.epoch is None else f"at epoch {watch.epoch}"
            if tracker is not None:
                # A store too busy to take the status now (SQLite locked by a process that
                # was killed mid-write) must not turn the interrupt into a traceback: the
                # run then stays RUNNING with a dead owner, and the next command reconciles it.
                with _warn_on_error("could not mark the run KILLED yet"):
                    tracker.fail(f"interrupted ({lifecycle.signal_name(signum)}) {where}", "KILLED")
            raise lifecycle.Interrupted(
                signum, f"interrupted {where}; {lifecycle.RESUME_HINT}"
            ) from None
        if tracker is not None:
            interrupted = isinstance(exc, KeyboardInterrupt)
            tracker.fail(f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
        if fitting and not isinstance(exc, KeyboardInterrupt):
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a failed run would fail again
        raise
    finally:
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
            with _warn_on_error("could not close the parent run"):
                tracking.close_parent(
                    opened.client,
                    opened.own_parent,
                    cfg.objective,
                    interrupted=outcome == "interrupted",
                    failed=outcome == "failed",
                )


def _processes(cfg: DictConfig) -> int:
    """The processes one run trains in: ``devices`` under ddp_spawn on CPUs, else one."""
    cpu = cfg.trainer.accelerator == "cpu"
    return cfg.trainer.devices if cpu and cfg.trainer.strategy == "ddp_spawn" else 1


def _launcher_cpus() -> int | None:
    """The CPUs a sweep job's launcher allots it (submitit's ``cpus_per_task``), if any."""
    if not HydraConfig.initialized():
        return None
    cpus = HydraConfig.get().launcher.get("cpus_per_task")
    return cpus if isinstance(cpus, int) and cpus >= 1 else None


def _checkpoint_dir(cfg: DictConfig, chash: str) -> Path:
    """Where this config's resume checkpoint lives: ``<dir>/<study>/<config hash>/``."""
    return Path(cfg.callbacks.checkpoint.dir) / cfg.study / chash


RESUME_RUN_FILE = "mlflow_run.json"  # beside last.ckpt: the MLflow run the checkpoint belongs to


def _resume_point(cfg: DictConfig, chash: str, ckpt_dir: Path, opened: _Opened) -> dict[str, Any]:
    """How ``_fit`` starts: from ``last.ckpt`` of an interrupted run of this config, if any.

    With MLflow, the interrupted (KILLED) run is continued: it replaces the new claim run,
    and only epochs after the last one it logged are sent.
    """
    from fitscope import tracking

    ckpt = ckpt_dir / "last.ckpt"
    run_file = ckpt_dir / RESUME_RUN_FILE
    if not ckpt.is_file():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a run file without a checkpoint
        return {}
    logged_through = -1
    if opened.tracker is not None and not opened.tracker.offline:
        previous = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
        taken = previous and tracking.take_over(
            opened.client, opened.tracker, previous, chash, "val/loss"
        )
        if not taken:  # that run is gone or did not end KILLED: start afresh
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            return {}
        record = opened.tracker.record
        opened.tracker, logged_through = taken
        if record is not None:  # the record now follows the run this process continues
            opened.tracker.record = record
            record.update(run_id=opened.tracker.run_id)
    log.info("resuming %s from %s", cfg.variant, ckpt)
    return {"resume_from": ckpt, "logged_through": logged_through}


@dataclass
class _Opened:
    """What a training run opened in MLflow, for the way out whatever happens."""

    client: Any = None
    tracker: Any = None  # the run (tracking.RunTracker), once the config is claimed
    own_parent: str | None = None  # a parent run this run opened itself
    precision: str = "32-true"  # trainer.precision as resolved on this machine (auto)
    num_threads: int = 1  # trainer.num_threads as resolved for this process (auto)


def _claim(cfg: DictConfig, dm, guard, opened: _Opened) -> float | None:
    """Claim this config with a RUNNING run (``opened.tracker``); the value to return if
    the job is skipped instead (a FINISHED run has it, or a live run holds it).

    A tracking server that does not answer (refused, timed out) does not stop the run: it
    trains without a claim into a pending record (tracking.open_record) that
    ``fitscope runs sync`` uploads later.
    """
    from fitscope import tracking

    run_cfg = _run_config(cfg)
    source = tracking.source_tags(_entry())
    commit = source["mlflow.source.git.commit"]
    tags = {
        "fitscope.variant": cfg.variant,
        "fitscope.dataset": cfg.data.name,
        "fitscope.study": cfg.study,
        "fitscope.profile": cfg.profile,
        "fitscope.overrides": " ".join(_task_overrides()),
        "fitscope.data_manifest_sha256": dm.manifest_sha256(),
        **source,
        "fitscope.precision": opened.precision,
        "fitscope.num_threads": str(opened.num_threads),
        **_job_info(),
    }
    chash = tracking.config_hash(run_cfg)
    uri = tracking.resolve_tracking_uri()
    record = {
        "experiment_description": study_description(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    parent = tracking.sweep_parents().get(cfg.study)
    # The parent this run finds or creates itself: its sweep's, when the sweep started with
    # the server unreachable, or the one named by tracking.parent_key for a single run.
    parent_spec = tracking.sweep_parents(tracking.PARENT_SPEC_ENV).get(cfg.study)
    if parent_spec is None and cfg.tracking.parent_key:
        parent_spec = {
            "parent_key": tracking.commit_parent_key(cfg.tracking.parent_key, commit),
            "parent_name": parent_run_name(cfg.study, cfg.profile, commit),
            "parent_tags": {"fitscope.study": cfg.study, "fitscope.profile": cfg.profile, **source},
        }
    try:
        client = opened.client = tracking.get_client(uri)
        exp_id = tracking.ensure_experiment(client, cfg.study, study_description(cfg))
        if not parent and parent_spec:
            parent = opened.own_parent = tracking.find_or_create_parent(
                client,
                exp_id,
                parent_spec["parent_key"],
                run_name=parent_spec["parent_name"],
                tags=parent_spec["parent_tags"],
            )
        if parent:
            tags[tracking.PARENT_TAG] = parent
        with guard.shield():  # a signal waits until the claim is settled either way
            claim = tracking.claim_run(
                client,
                exp_id,
                chash,
                cfg.variant,
                tracking.flatten(run_cfg),
                tags,
                force=cfg.force,
            )
            opened.tracker = claim.tracker
            if claim.tracker is not None:
                claim.tracker.record = tracking.open_record(
                    uri,
                    cfg.study,
                    cfg.variant,
                    tracking.flatten(run_cfg),
                    {**tags, tracking.CONFIG_HASH_TAG: chash},
                    run_id=claim.tracker.run_id,
                    parent_run_id=parent,
                    **record,
                )
    except Exception as exc:
        if not tracking.server_down(uri, exc):
            raise
        if not parent and parent_spec:
            record.update(parent_spec)
        opened.client, opened.own_parent = None, None
        opened.tracker = tracking.RunTracker(
            None,
            None,
            tracking.open_record(
                uri,
                cfg.study,
                cfg.variant,
                tracking.flatten(run_cfg),
                {
                    **tags,
                    tracking.CONFIG_HASH_TAG: chash,
                    tracking.OFFLINE_TAG: tracking.OFFLINE_NOTE,
                },
                parent_run_id=parent,
                claimed=False,
                **record,
            ),
        )
        opened.tracker.go_offline(f"before the run started: {tracking.first_line(exc)}")
        return None
    for gone in claim.reconciled:
        log.warning(
            "run %s (%s) was left RUNNING: now KILLED, %s", gone.run_id, gone.run_name, gone.reason
        )
    if claim.finished is not None:
        log.info(
            "skipping %s: run %s already finished with this config (force=true re-runs it)",
            cfg.variant,
            claim.finished.info.run_id,
        )
        return _finite(claim.finished.data.metrics.get(f"best/{cfg.objective}"), cfg.objective)
    if claim.holder is not None:
        log.info(
            "skipping %s: already running in %s (MLflow run %s)",
            cfg.variant,
            tracking.run_owner(claim.holder) or "another process",
            claim.holder.info.run_id,
        )
        return worst_value(cfg.objective)
    return None


@contextlib.contextmanager
def _warn_on_error(what: str) -> Iterator[None]:
    """Bookkeeping in a ``finally`` must not hide the outcome it follows."""
    try:
        yield
    except Exception as exc:
        log.warning("%s: %s", what, exc)


def _fit(
    cfg: DictConfig,
    dm,
    run_dir: Path,
    tracker,
    extra_callbacks=(),
    *,
    ckpt_dir: Path,
    precision: str,
    num_threads: int,
    resume_from: Path | None = None,
    logged_through: int = -1,
) -> float:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import EarlyStopping

    from fitscope import lifecycle
    from fitscope.models import ProbabilityModel, build_mlp_from_config, count_parameters
    from fitscope.scoring import test_scores
    from fitscope.training import (
        EpochHistory,
        EpochProgress,
        FitModule,
        MlflowEpochLogger,
        PeriodicCheckpoint,
        RestoreBestWeights,
        ReturnToMain,
        build_trainer,
    )

    torch.set_num_threads(num_threads)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning-internal deprecation
    # Lightning's start-up banners (GPU available, tips) add nothing to our logs.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    reg = cfg.regularization
    mlp = build_mlp_from_config(cfg, dm.num_features)
    steps = len(dm.train_dataloader())
    module = FitModule(
        mlp,
        task=cfg.data.task,
        num_classes=cfg.data.num_classes,
        l2=reg.l2,
        l2_include_output=reg.l2_include_output,
        optimizer=OmegaConf.to_container(cfg.optimizer),
        scheduler=OmegaConf.to_container(cfg.scheduler),
        steps_per_epoch=steps,
        monitor=cfg.callbacks.early_stopping.monitor,
    )
    es_cfg = cfg.callbacks.early_stopping
    history = EpochHistory()
    callbacks: list[pl.Callback] = [*extra_callbacks, history]
    restore = None
    if es_cfg.restore_best_weights:
        restore = RestoreBestWeights(es_cfg.monitor, es_cfg.mode, es_cfg.min_delta)
        callbacks.append(restore)
    early = None
    if es_cfg.enabled:
        early = EarlyStopping(
            monitor=es_cfg.monitor,
            mode=es_cfg.mode,
            patience=es_cfg.patience,
            min_delta=es_cfg.min_delta,
            check_finite=False,
        )
        callbacks.append(early)
    if cfg.progress:
        # After restore and early: it reads the best epoch and patience they just updated.
        # A sweep's worker processes share one terminal: they write plain lines.
        line = LineProgress(
            f"{cfg.variant} seed {cfg.seed}",
            every_s=cfg.progress_every_s,
            live=False if lifecycle.in_worker() else None,
        )
        callbacks.append(
            EpochProgress(
                line,
                max_epochs=cfg.trainer.max_epochs,
                monitor=es_cfg.monitor,
                restore=restore,
                early=early,
            )
        )
    if tracker is not None:
        callbacks.append(
            MlflowEpochLogger(
                tracker, history, every=cfg.logger.flush_every, logged_through=logged_through
            )
        )
    # What the summary below reads (rank 0 logged to MLflow itself).
    kept = {"history": history, "restore": restore, "early": early}
    returned = ReturnToMain(
        run_dir / ".ddp_callbacks.pt", {k: v for k, v in kept.items() if v is not None}
    )
    callbacks.append(returned)
    ckpt_cfg = cfg.callbacks.checkpoint
    if ckpt_cfg.every_s is not None or ckpt_cfg.every_epochs is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tracker is not None and tracker.run_id:
            write_json(ckpt_dir / RESUME_RUN_FILE, {"run_id": tracker.run_id})
        # Last: it saves the state the callbacks above have just updated for this epoch.
        callbacks.append(
            PeriodicCheckpoint(
                ckpt_dir / "last.ckpt",
                every_s=ckpt_cfg.every_s,
                every_epochs=ckpt_cfg.every_epochs,
            )
        )
    trainer = build_trainer(
        callbacks,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        deterministic=cfg.trainer.deterministic,
        precision=precision,
        strategy=cfg.trainer.strategy,
        progress_bar=cfg.callbacks.progress_bar,
        root_dir=str(run_dir),
    )
    omp_before = os.environ.get("OMP_NUM_THREADS")
    if cfg.trainer.strategy == "ddp_spawn":
        # Spawned workers start fresh: torch reads its thread count from the environment.
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    returned.clear()  # only a file this fit writes is ever read back
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    except torch.multiprocessing.ProcessRaisedException as exc:
        # A DDP worker's error reaches this process as the text of its traceback: kept in
        # the log, and its last line (the error itself) becomes the run's one-line failure.
        log.error("a DDP worker failed:%s", exc)
        raise FitscopeError(f"a DDP worker failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:  # the next job of a sweep in this process resolves `auto` afresh
        if omp_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_before
    wall = time.perf_counter() - started
    returned.restore(spawned=cfg.trainer.strategy == "ddp_spawn")  # the workers' state
    if not history.rows:
        raise FitscopeError("training produced no epochs. Fix: check trainer.max_epochs")

    # The selected epoch is the restored best one, or the last one without restore.
    selected = history.rows[-1]["epoch"]
    if restore is not None and restore.best_epoch is not None:
        selected = restore.best_epoch
    row = next(r for r in history.rows if r["epoch"] == selected)
    # A selected epoch without a finite objective (validation diverged) is a failed run:
    # refused before any output is written, so no model.pt or metrics.json claims success.
    value = _finite(row[cfg.objective], cfg.objective)
    stopped = history.rows[-1]["epoch"]
    # The test split is scored here, by the process that trained, rather than by a stage
    # that would start Python and torch again only to reload the model (docs/pipeline.md);
    # on the device that trained it (Lightning moves the model back to the CPU after the
    # fit: one CPU thread took ~130 s for the 10.5M full-HIGGS rows that a GPU scores in
    # seconds), before the model is saved from the CPU.
    train_split = dm.mapped or dm.tensors["train"]  # mapped: the full HIGGS file
    scores = test_scores(
        mlp.to(trainer.strategy.root_device).eval(),
        cfg.data.task,
        cfg.data.num_classes,
        dm.tensors["test"],
        train_split,
    )
    model_cpu = mlp.to("cpu").eval()
    # Grouped by what they describe, so the MLflow UI draws them in sensible chart groups.
    summary = {
        "fit/best_epoch": selected,
        "fit/stopped_epoch": stopped,
        "fit/early_stopped": float(early is not None and early.stopped_epoch > 0),
        "fit/epochs_run": len(history.rows),
        "fit/wall_time_s": wall,
        "model/n_params": count_parameters(mlp),
        **{f"best/{k}": v for k, v in row.items() if k.startswith(("train/", "val/"))},
        "best/gap_loss": row["val/loss"] - row["train/loss"],
        **{
            k.replace("train_eval_", "train_eval/") if k.startswith("train_") else f"test/{k}": v
            for k, v in scores.items()
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    history.write_csv(run_dir / "history.csv")
    if cfg.callbacks.checkpoint.save_best:
        with atomic_path(run_dir / "model.pt") as tmp:
            torch.save(
                {
                    "state_dict": model_cpu.state_dict(),
                    "config": OmegaConf.to_container(cfg, resolve=True),
                },
                tmp,
            )
    metrics_out: dict[str, Any] = {metrics_file_key(k): v for k, v in summary.items()}
    metrics_out["seed"] = cfg.seed
    metrics_out["precision"] = precision
    metrics_out["num_threads"] = num_threads
    if tracker is not None:
        metrics_out["mlflow_run_id"] = tracker.run_id
        _log_run_record(cfg, dm, tracker, history.rows, summary, run_dir)
        if cfg.logger.log_model:
            info = tracker.log_model(
                ProbabilityModel(model_cpu, cfg.data.task),
                dm.tensors["val"][0][:5].numpy(),
                step=selected,
                registered_name=cfg.logger.registered_model,
            )
            if info is not None:  # None: the model waits in the pending record
                metrics_out["mlflow_model_uri"] = info.model_uri
        tracker.log_dict(metrics_out, "metrics.json")
        tracker.finish()
        if tracker.pending:  # the run id comes with `fitscope runs sync`
            metrics_out["mlflow_sync_id"] = tracker.record.sync_id
    # Written last: a metrics.json means the run, its outputs and its tracking are complete.
    write_json(run_dir / "metrics.json", metrics_out)
    log.info(
        "%s: best epoch %d, %s=%.4f (stopped at %d, %.1fs)",
        cfg.variant,
        selected,
        cfg.objective,
        row[cfg.objective],
        stopped,
        wall,
    )
    return value


def metrics_file_key(key: str) -> str:
    """The metrics.json name of an MLflow summary key: ``fit/best_epoch`` -> ``best_epoch``,
    ``model/n_params`` -> ``n_params``, ``best/val/loss`` -> ``best_val_loss``."""
    group, _, rest = key.partition("/")
    return rest if group in ("fit", "model") else key.replace("/", "_")


def _log_run_record(
    cfg: DictConfig, dm, tracker, rows: list[dict[str, float]], summary: dict[str, float], run_dir
) -> None:
    """Everything a reviewer reads in the MLflow UI besides the curves: summary metrics at
    the selected epoch, the dataset, the verdict and description, and the run's files."""
    from fitscope.report.study import describe_run, own_verdict, run_figure

    selected = int(summary["fit/best_epoch"])
    tracker.log_summary(summary, step=selected)
    manifest = json.loads(dm.manifest_path.read_text())
    tracker.log_dataset(
        name=cfg.data.name,
        source=str(Path(cfg.data.dir).resolve()),
        digest=dm.manifest_sha256(),
        profile={s: v.get("rows") for s, v in manifest.get("splits", {}).items()},
        context="training",
    )
    verdict = own_verdict(rows)
    note = describe_run(cfg.variant, cfg.profile, verdict, summary, summary, provisional=True)
    tracker.set_tags({"fitscope.verdict": verdict, "mlflow.note.content": note})
    tracker.log_artifact(run_dir / "history.csv")
    tracker.log_dict(OmegaConf.to_container(cfg, resolve=True), "config/resolved.yaml")
    if (run_dir / ".hydra").is_dir():
        tracker.log_artifacts(run_dir / ".hydra", "config/hydra")
    figure = run_figure(rows, cfg.variant, selected, run_dir / "learning_curves.png")
    tracker.log_artifact(figure)


def _finite(value: float | None, name: str) -> float:
    """Sweepers crash on NaN or non-floats: always hand back a finite Python float."""
    if value is None or not math.isfinite(value):
        raise FitscopeError(f"{name} is not a finite number ({value}). Fix: see the run's log")
    return float(value)


class MlflowSweepCallback(Callback):
    """Validates every run and sweep job first; groups a multirun's jobs under one MLflow
    parent run per study (created before any job; a DVC train stage's jobs span several)."""

    @callback_errors_exit
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Before Hydra creates the run directory: a bad config leaves nothing behind.
        validate_run(config, validate)

    @callback_errors_exit
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Every job is checked before anything exists: a bad job creates no parent run.
        studies: dict[str, DictConfig] = {}  # the first job of each study the sweep trains

        def check(job: DictConfig) -> None:
            validate(job)
            studies.setdefault(job.study, job)

        jobs = validate_jobs(config, check)
        prepare_driver(config.hydra.launcher)
        log.info("sweep of %d job(s) validated; outputs in %s", jobs, config.hydra.sweep.dir)
        (Path(config.hydra.sweep.dir) / FAILED_JOBS).unlink(missing_ok=True)
        (Path(config.hydra.sweep.dir) / JOBS_DONE_FILE).unlink(missing_ok=True)
        # A search's jobs are drawn as it goes: its count is the trial budget. Workers
        # (started after this hook) inherit the variable.
        total = config.hydra.sweeper.n_trials if is_search(config) else jobs
        os.environ[SWEEP_JOBS_ENV] = str(total)
        if config.logger.name != "mlflow":
            return
        from fitscope import tracking

        overrides = list(config.hydra.overrides.task)
        # The same sweep finds its parents again when restarted, even with another launcher,
        # more trials or more parallel jobs: only what defines the jobs goes into the key.
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        source = tracking.source_tags(_entry())
        commit = source["mlflow.source.git.commit"]
        # One parent per study (MLflow experiment); a DVC train stage's jobs span several.
        specs: dict[str, dict[str, Any]] = {}
        for study, job in studies.items():
            tags = {"fitscope.study": study, "fitscope.profile": job.profile, **source}
            if config.tracking.parent_key:
                # An explicit key (DVC sets one) groups the sweeps of one pipeline run under
                # one parent per study: same key and same git commit. Several stages share
                # it, each with its own overrides: those are on each child run, not here.
                key = tracking.commit_parent_key(config.tracking.parent_key, commit)
            else:
                identity = {
                    "study": study,
                    "overrides": sorted(
                        o for o in overrides if not o.startswith(("hydra.", "hydra/"))
                    ),
                    "sweeper": {k: sweeper.get(k) for k in ("sampler", "params", "direction")},
                }
                key = tracking.config_hash(identity)
                tags["fitscope.overrides"] = " ".join(overrides)
            name = parent_run_name(study, job.profile, commit)
            specs[study] = {"parent_key": key, "parent_name": name, "parent_tags": tags}
        uri = tracking.resolve_tracking_uri()
        parents: dict[str, str] = {}
        try:
            client = tracking.get_client(uri)
            for study, spec in specs.items():
                exp_id = tracking.ensure_experiment(
                    client, study, study_description(studies[study])
                )
                parents[study] = tracking.find_or_create_parent(
                    client,
                    exp_id,
                    spec["parent_key"],
                    run_name=spec["parent_name"],
                    tags=spec["parent_tags"],
                )
        except Exception as exc:
            if not tracking.server_down(uri, exc):
                raise
            # The jobs train anyway; each finds or creates its parent once the server is
            # back, or keeps it in its pending record for `fitscope runs sync`.
            os.environ[tracking.PARENT_SPEC_ENV] = json.dumps(specs)
            log.warning(
                "the tracking server %s is unreachable (%s): the jobs train anyway and keep "
                "their records on disk; the sweep's parent runs are made when they reach the "
                "server or by `fitscope runs sync`",
                uri,
                tracking.first_line(exc),
            )
            return
        # Jobs (also joblib/loky workers, started after this hook) inherit the variable.
        os.environ[tracking.PARENT_ENV] = json.dumps(parents)
        for study, parent in parents.items():
            log.info("MLflow parent run %s in experiment %r", parent, study)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Runs in the job's own process (also a joblib worker): "<done>/<total> jobs done".
        total = os.environ.get(SWEEP_JOBS_ENV)
        if total and config.get("progress") and config.hydra.mode == RunMode.MULTIRUN:
            # A DVC train stage's jobs span studies: the stage names the sweep.
            job_done(config.hydra.sweep.dir, int(total), os.environ.get("DVC_STAGE", config.study))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fitscope import lifecycle, tracking

        failed_file = Path(config.hydra.sweep.dir) / FAILED_JOBS
        failed = failed_file.read_text().splitlines() if failed_file.exists() else []
        parents = tracking.sweep_parents()
        offline = tracking.sweep_parents(tracking.PARENT_SPEC_ENV)
        os.environ.pop(tracking.PARENT_ENV, None)
        os.environ.pop(tracking.PARENT_SPEC_ENV, None)
        signum = lifecycle.received()
        best, cut_off = None, False
        for parent in parents.values():
            try:
                best = (
                    tracking.close_parent(
                        tracking.get_client(),
                        parent,
                        config.objective,
                        interrupted=signum is not None,
                        tolerate_failures=is_search(config),
                    )
                    or best
                )
            except Exception as exc:
                if not tracking.unreachable(exc):
                    raise
                cut_off = True  # the jobs kept their records: the sync closes the parent
                log.warning(
                    "the sweep's parent run %s is not closed (the tracking server is "
                    "unreachable); `fitscope runs sync` closes it with the jobs' runs",
                    parent,
                )
        if offline:
            from fitscope.pending import PendingRecord, spool_dir

            cut_off = True  # no parent to judge the sweep by: the sync closes it
            if PendingRecord.all(spool_dir()):
                log.warning(
                    "fitscope: the sweep's runs wait to be synced (the tracking server was "
                    "unreachable): their records are in %s; when the server is back, run "
                    "`fitscope runs sync` (it also nests them under the sweep's parent run)",
                    spool_dir(),
                )
        if signum is not None:
            # Ctrl-C / SIGTERM reached the jobs in the workers; each ended its run KILLED
            # and returned, so the sweep ended normally. Report it as the interrupt it is.
            stopped = [
                f"job {num} {variant} at epoch {m.group(1)}"
                for num, variant, reason in (line.split("\t", 2) for line in failed)
                if (m := re.match(r"interrupted at epoch (\d+)", reason))
            ]
            detail = f"; runs KILLED: {', '.join(stopped)}" if stopped else ""
            raise lifecycle.Interrupted(
                signum,
                f"interrupted ({lifecycle.signal_name(signum)}){detail}; {lifecycle.RESUME_HINT}",
            )
        if is_search(config):
            # A search tolerates failed trials; it fails only when no trial finished.
            if parents and best is None and not cut_off:
                raise SystemExit(
                    f"fitscope: error: every job of the sweep failed (MLflow parent run "
                    f"{', '.join(parents.values())}; each FAILED run has the reason in its "
                    "fitscope.failure tag). "
                    "Fix: see those reasons, e.g. narrow the learning-rate range"
                )
        elif failed:
            # A plain sweep (and every DVC train stage) must not look successful.
            names = ", ".join(line.split("\t")[1] for line in failed)
            raise SystemExit(
                f"fitscope: error: {len(failed)} job(s) of the sweep failed ({names}); the "
                f"reasons are in {failed_file} and the FAILED MLflow runs. Fix: see those reasons"
            )


FAILED_JOBS = "failed_jobs.tsv"
SWEEP_JOBS_ENV = "FITSCOPE_SWEEP_JOBS"  # a sweep's job count, for the "jobs done" lines


def worst_value(objective: str) -> float:
    """What a failed sweep job reports: never NaN (it crashes the Optuna sweeper)."""
    return math.inf if objective.endswith("loss") else -math.inf


@hydra.main(config_path=_conf_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    from fitscope import lifecycle
    from fitscope.cli import run_cli

    if _job_info():
        # In a sweep one failed job must not crash the others: record it (the sweep's end
        # decides the exit code), report the worst value to the sweeper.
        try:
            return train(cfg)
        except FitscopeError as exc:
            log.error("fitscope: error: %s", exc)
            _record_failed_job(cfg, str(exc))
            return worst_value(cfg.objective)
        except lifecycle.Interrupted as exc:
            if not lifecycle.in_worker():
                raise  # the job ran in the sweep's own process: the sweep stops here
            # A worker returns: raising would make joblib SIGKILL the other workers while
            # they end their runs. The sweep's process reports the interrupt at its end.
            log.warning("%s (job %s): %s", cfg.variant, HydraConfig.get().job.num, exc.message)
            _record_failed_job(cfg, exc.message)
            return worst_value(cfg.objective)
    return run_cli(lambda: train(cfg))


def _record_failed_job(cfg: DictConfig, reason: str) -> None:
    hc = HydraConfig.get()
    one_line = " ".join(reason.split())  # a tab or newline would break the TSV's rows
    with open(Path(hc.sweep.dir) / FAILED_JOBS, "a") as fh:
        fh.write(f"{hc.job.num}\t{cfg.variant}\t{one_line}\n")


def main() -> None:
    """Console script ``fitscope-train`` (and ``python -m fitscope.train``).

    Every usage error is one line and exit code 2. Runs Hydra under fitscope's process
    lifecycle (signals, orphan watchdog: lifecycle.py) and closes a sweep's parent run
    that the sweep left open (Hydra skips ``on_multirun_end`` when the sweep raises).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fitscope import lifecycle, tracking
    from fitscope.sweeps import usage_error

    inherited = os.environ.get(tracking.PARENT_ENV)
    # conf/hydra/launcher/ray.yaml replaces the Ray plugin's preset of the same name on
    # purpose (and is checked against its schema): Hydra's deprecation notice is noise.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against")

    def close_open_parent(outcome: str) -> None:
        parents = os.environ.pop(tracking.PARENT_ENV, None)
        if parents and parents != inherited:
            for parent in json.loads(parents).values():
                tracking.close_parent(
                    tracking.get_client(),
                    parent,
                    interrupted=outcome == "interrupted",
                    failed=outcome == "failed",
                )

    def run_hydra() -> None:
        # Hydra prints its own errors over several lines and exits 1; with this set it
        # raises them, and they are printed here the way fitscope prints every usage error.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            _hydra_main()
        except FitscopeError as exc:
            print(f"fitscope: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except (HydraException, OmegaConfBaseException) as exc:
            print(f"fitscope: error: {usage_error(exc)}", file=sys.stderr)
            raise SystemExit(2) from None

    lifecycle.run_entry(run_hydra, close_open_parent)


if __name__ == "__main__":
    main()
