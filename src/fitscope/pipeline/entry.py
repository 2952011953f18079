"""The Hydra entry (``fitscope-train``, ``python -m fitscope.train``): one-line usage
errors, the process lifecycle, and the sweep parents a failed sweep left open.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fitscope.core.errors import FitscopeError, run_cli
from fitscope.core.extras import require_launcher
from fitscope.pipeline.identity import job_info, worst_value
from fitscope.pipeline.job import train
from fitscope.pipeline.lifecycle import Interrupted, in_worker, run_entry
from fitscope.pipeline.sweep_callback import FAILED_JOBS
from fitscope.pipeline.sweeps import usage_error
from fitscope.tracking.parents import close_parent
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PARENT_ENV

log = logging.getLogger(__name__)


def _conf_dir() -> str:
    """``./conf`` when run from a fitscope checkout, else the package's own checkout."""
    here = Path.cwd() / "conf"
    if (here / "train.yaml").is_file():
        return str(here)
    return str(Path(__file__).resolve().parents[3] / "conf")


@hydra.main(config_path=_conf_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:

    if job_info():
        # In a sweep one failed job must not crash the others: record it (the sweep's end
        # decides the exit code), report the worst value to the sweeper.
        try:
            return train(cfg)
        except FitscopeError as exc:
            log.error("fitscope: error: %s", exc)
            record_failed_job(cfg, str(exc))
            return worst_value(cfg.objective)
        except Interrupted as exc:
            if not in_worker():
                raise  # the job ran in the sweep's own process: the sweep stops here
            # A worker returns: raising would make joblib SIGKILL the other workers while
            # they end their runs. The sweep's process reports the interrupt at its end.
            log.warning("%s (job %s): %s", cfg.variant, HydraConfig.get().job.num, exc.message)
            record_failed_job(cfg, exc.message)
            return worst_value(cfg.objective)
    return run_cli(lambda: train(cfg))


def record_failed_job(cfg: DictConfig, reason: str) -> None:
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

    inherited = os.environ.get(PARENT_ENV)
    # conf/hydra/launcher/ray.yaml replaces the Ray plugin's preset of the same name on
    # purpose (and is checked against its schema): Hydra's deprecation notice is noise.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against")

    def close_open_parent(outcome: str) -> None:
        parents = os.environ.pop(PARENT_ENV, None)
        if parents and parents != inherited:
            for parent in json.loads(parents).values():
                close_parent(
                    get_client(),
                    parent,
                    interrupted=outcome == "interrupted",
                    failed=outcome == "failed",
                )

    def run_hydra() -> None:
        # Hydra prints its own errors over several lines and exits 1; with this set it
        # raises them, and they are printed here the way fitscope prints every usage error.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            require_launcher(sys.argv[1:])  # a launcher's extra, before Hydra looks for it
            _hydra_main()
        except FitscopeError as exc:
            print(f"fitscope: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except (HydraException, OmegaConfBaseException) as exc:
            print(f"fitscope: error: {usage_error(exc)}", file=sys.stderr)
            raise SystemExit(2) from None

    run_entry(run_hydra, close_open_parent)


def run_train(overrides: list[str], jobs: list[list[str]] | None = None) -> None:
    """``fitscope-train -m OVERRIDES`` in this process (one Python start per stage).

    ``jobs``: one override list per job, launched by the job-list sweeper
    (``hydra_plugins.fitscope_sweeper``); Hydra records them in the sweep's multirun.yaml.
    """

    if jobs:
        from hydra.core.config_store import ConfigStore

        from hydra_plugins.fitscope_sweeper import JobListSweeperConf

        node = JobListSweeperConf(jobs=jobs)
        ConfigStore.instance().store(group="hydra/sweeper", name="dvc_stage", node=node)
        overrides = ["hydra/sweeper=dvc_stage", *overrides]
    sys.argv = ["fitscope-train", "-m", *overrides]
    main()
