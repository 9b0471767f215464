"""Submitit launchers for sweeps: one run = one job, finished runs skipped, failures isolated.

hydra-submitit-launcher submits every run of a batch as one job array, then collects results in
order and raises at the first job that died on the cluster (out of memory, time limit, node
failure) while later jobs are still running. These subclasses differ in two ways:

* before submitting, each run's directory (``hydra.sweep.dir/hydra.sweep.subdir``) is checked:
  a ``results.json`` holding everything the run's config asks for (:func:`hbllm.results.finished`,
  the rule the app itself uses: the quantized model and every evaluation, by their keys) means
  the run is finished and it is not submitted again (unless the run sets ``resume=false``), so
  rerunning a sweep resumes it;
* every job is waited for; a job lost on the cluster becomes a FAILED ``JobReturn`` instead of an
  exception, and a summary lists the failed runs with their log files. Hydra's sweeper then
  exits non-zero once all runs are over, so CI and shells still see the failure.

Selected by ``hydra/launcher=slurm`` (and the ``slurm_*`` presets) or ``hydra/launcher=local``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher, LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# keys of the launcher config that submitit takes as executor-specific init arguments
_INIT_KEYS = {"max_num_timeout"}


def run_finished(run_dir: Path, resolved: dict[str, Any]) -> bool:
    """True when ``run_dir/results.json`` holds everything the run's resolved config asks for
    (:func:`hbllm.results.finished`); False when absent or unreadable."""
    from hbllm.results import finished, read_json

    try:
        return finished(read_json(Path(run_dir) / "results.json"), resolved)
    except (OSError, ValueError):
        return False


class _SweepMixin(BaseSubmititLauncher):
    """Shared ``launch`` for the SLURM and local variants."""

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = idx
            cfg.hydra.job.id = f"job_id_for_{idx}"
        return cfg

    def _skip(self, overrides: Sequence[str], idx: int) -> JobReturn | None:
        """A COMPLETED JobReturn when the run already finished (and may be resumed), else None."""
        cfg = self._job_config(overrides, idx)
        HydraConfig.instance().set_config(cfg)  # the run dir may use ${hydra:...}
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                    else cfg[k] for k in cfg if k != "hydra"}
        if OmegaConf.select(cfg, "resume", default=True) is False or \
                not run_finished(run_dir, resolved):
            return None
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} -- finished in {run_dir}, "
                 "skipped")
        ret = JobReturn(overrides=list(overrides), working_dir=str(run_dir),
                        task_name=str(cfg.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = None
        return ret

    def _executor(self) -> Any:
        import submitit

        prefix = self._EXECUTOR
        init = {f"{prefix}_{k}": v for k, v in self.params.items() if k in _INIT_KEYS}
        executor = submitit.AutoExecutor(cluster=prefix, folder=self.params["submitit_folder"],
                                         **init)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            (k if k in generic else f"{prefix}_{k}"): v
            for k, v in self.params.items() if k not in _INIT_KEYS | {"submitit_folder"}})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns: list[JobReturn | None] = []
        todo = []
        state = Singleton.get_state()
        hydra_cfg = HydraConfig.instance().cfg  # _skip points it at each run's config
        for pos, overrides in enumerate(job_overrides):
            idx = initial_job_idx + pos
            ret = self._skip(overrides, idx)
            returns.append(ret)
            if ret is None:
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                todo.append((pos, (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                   state)))
        HydraConfig.instance().cfg = hydra_cfg
        log.info(f"Submitit '{self._EXECUTOR}': {len(todo)} job(s) to run, "
                 f"{len(job_overrides) - len(todo)} already finished; sweep dir {sweep_dir}")
        if not todo:
            return returns  # type: ignore[return-value]

        jobs = self._executor().map_array(self, *zip(*(params for _, params in todo)))
        failed = []
        for (pos, params), job in zip(todo, jobs):
            try:
                returns[pos] = job.results()[0]
            except submitit.core.utils.UncompletedJobError as err:
                ret = JobReturn(overrides=params[0], status=JobStatus.FAILED)
                ret.return_value = err
                returns[pos] = ret
            if returns[pos].status != JobStatus.COMPLETED:
                failed.append(f"  job {job.job_id} ({' '.join(filter_overrides(params[0]))}): "
                              f"{returns[pos]._return_value!r:.300}\n    log: {job.paths.stderr}")
        if failed:
            log.error(f"{len(failed)} of {len(jobs)} job(s) failed (the others finished; rerun the "
                      "same command to retry only the unfinished runs):\n" + "\n".join(failed))
        return returns  # type: ignore[return-value]


class ResumingSlurmLauncher(_SweepMixin, SlurmLauncher):
    """``submitit_slurm`` that skips finished runs and survives lost jobs."""


class ResumingLocalLauncher(_SweepMixin, LocalLauncher):
    """``submitit_local`` that skips finished runs and survives lost jobs."""
