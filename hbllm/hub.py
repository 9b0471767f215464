"""Whether the Hugging Face hub may be used: the one offline rule of hbllm, shared by model,
data and zero-shot loading, so one run never decides both online and offline."""
from __future__ import annotations

import contextlib
import threading

PROBE_TIMEOUT_S = 5.0  # how long the reachability probe may take, DNS included


def offline_setting() -> str | None:
    """The environment's offline setting, or None: ``datasets``' flag, which HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set (and which :func:`forced_offline` sets for a block)."""
    import datasets

    return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else None


def offline_reason(forced: str | None = None) -> str | None:
    """Why the hub must not be contacted, None when it may be: ``forced`` (a config setting that
    asks for offline, e.g. ``"data.offline=true"``), the environment's setting, else a probe of
    the hub endpoint that fails or does not answer within :data:`PROBE_TIMEOUT_S` seconds."""
    return forced or offline_setting() or _probe()


@contextlib.contextmanager
def forced_offline(enabled: bool):
    """Make ``datasets`` / ``huggingface_hub`` use only their local cache inside the block."""
    if not enabled:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _probe() -> str | None:
    """One HEAD request to the hub endpoint in a daemon thread (so a hanging DNS can't block);
    any HTTP answer counts as reachable."""
    from huggingface_hub import constants, get_session

    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure to get a response: unreachable
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    if thread.is_alive():
        return f"{constants.ENDPOINT} did not answer within {PROBE_TIMEOUT_S:.0f} s"
    if "error" in outcome:
        return f"{constants.ENDPOINT} is unreachable ({outcome['error']})"
    return None
