"""Weights & Biases logging of one run (``logger`` config group).

``logger.mode=online`` falls back to ``offline`` when no API key is configured (WANDB_API_KEY
or a ``wandb login`` entry in ~/.netrc), so a run never blocks on a login prompt or on the
network. Run name, group and tags come from the model and the quantization method, so the
variants of one method on one model land in one dashboard group.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from .config import RunConfig

log = logging.getLogger(__name__)


def has_api_key() -> bool:
    """Whether a W&B API key is configured (environment or ~/.netrc); the key is not read."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def effective_mode(mode: str) -> str:
    """``mode``, made stricter by WANDB_MODE (offline/disabled) and offline when online was
    asked without an API key."""
    env = os.environ.get("WANDB_MODE")
    if mode == "disabled" or env == "disabled":
        return "disabled"
    if env in ("offline", "dryrun"):
        return "offline"
    if mode == "online" and not has_api_key():
        log.warning("No W&B API key configured (WANDB_API_KEY or `wandb login`): logging offline; "
                    "upload later with `wandb sync`")
        return "offline"
    return mode


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """W&B run name, group, job type and tags derived from model, method and calibration set.
    The runs of one config over seeds/repeats share the default group and always the job type
    ``<method>-<config identity>`` (:func:`hbllm.stats.group_key`)."""
    from dataclasses import asdict

    from .stats import group_key

    config_id = f"{cfg.quant.label}-{group_key(asdict(cfg))}"
    name = cfg.name or f"{cfg.model.name}-{cfg.quant.label}-{cfg.calib.name}"
    group = cfg.logger.group or f"{cfg.model.name}-{config_id}"
    tags = [cfg.model.name, cfg.quant.method, cfg.quant.label, f"calib-{cfg.calib.name}",
            *cfg.logger.tags]
    return {"name": name, "group": group, "job_type": config_id, "tags": list(dict.fromkeys(tags))}


class Tracker:
    """A W&B run (or nothing when disabled). ``resolved``: the full resolved config dict."""

    def __init__(self, cfg: RunConfig, resolved: dict[str, Any], run_dir: Path, key: str):
        self.mode = effective_mode(cfg.logger.mode)
        self.run = None
        if self.mode == "disabled":
            return  # wandb is not even imported
        import wandb

        wdir = Path(cfg.logger.dir or run_dir)
        wdir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity,
                              config=resolved, dir=str(wdir), mode=self.mode,
                              id=f"{key}-{os.getpid()}", reinit="finish_previous",
                              # saved files are snapshots (hard link or copy), not symlinks to
                              # files the run dir rewrites later (results.json of a resumed run)
                              settings=wandb.Settings(symlink=False), **run_identity(cfg))

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def save(self, path: Path, base: Path) -> None:
        """Store ``path`` (under ``base``) in the run's files; call it once the file is final
        (offline runs keep it as ``files/<path relative to base>``, uploaded by ``wandb sync``)."""
        if self.run is not None and Path(path).exists():
            self.run.save(str(path), base_path=str(base), policy="end")

    def finish(self, exit_code: int | None = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
