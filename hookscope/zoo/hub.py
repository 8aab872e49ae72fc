"""Hugging Face hub models (the pythia family) with a fast, clear failure when offline.

Order of attempts: the local Hugging Face cache (no network); then, unless
``HF_HUB_OFFLINE`` is set, a 5-second TCP probe of the hub endpoint, and only if it answers
the real ``from_pretrained`` download. So a machine without the hub gets a
:class:`~hookscope.errors.ModelLoadError` in seconds instead of minutes of retries, and never
a half-loaded model.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from hookscope.errors import ModelLoadError
from hookscope.model import HookedModel

__all__ = ["load_from_hub", "hub_reachable", "PYTHIA_SIZES"]

PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_TRUE = {"1", "true", "yes", "on"}


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """Whether the hub endpoint (``HF_ENDPOINT`` or huggingface.co) accepts a TCP connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return False, f"{host}:{port} unreachable ({err})"
    return True, f"{host}:{port}"


def _how_to_get(repo_id: str) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return (
        f"To get the weights: on a machine with internet run `huggingface-cli download {repo_id}` and copy "
        f"its cache folder to {cache} here, or save the model with save_pretrained and pass that folder to "
        "hookscope.HookedModel.from_pretrained(path)."
    )


def _from_cache(repo_id: str, extra: dict, kwargs: dict) -> tuple[HookedModel | None, str]:
    """(the model from the local Hugging Face cache, "") or (None, why it is not usable)."""
    try:
        return HookedModel.from_pretrained(repo_id, local_files_only=True, **extra, **kwargs), ""
    except ModelLoadError as err:
        if _config_cached(repo_id, extra.get("revision"), kwargs.get("cache_dir")):
            return None, f"is in the local Hugging Face cache but does not load from it ({err})"
        return None, "is not in the local Hugging Face cache"


def _config_cached(repo_id: str, revision: str | None, cache_dir: str | None) -> bool:
    """Whether the cache holds the repo's config.json (so a failed cached load is a real
    error, such as a truncated file, rather than an absent model)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def load_from_hub(repo_id: str, revision: str | None = None, **kwargs: Any) -> HookedModel:
    """``HookedModel.from_pretrained(repo_id)`` from the cache, or the hub when reachable."""
    extra = {"revision": revision} if revision is not None else {}
    cached, why = _from_cache(repo_id, extra, kwargs)
    if cached is not None:
        return cached
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if _offline():
        raise ModelLoadError(
            f"{where} {why} and HF_HUB_OFFLINE is set, so the hub is not asked. "
            f"{_how_to_get(repo_id)}"
        )
    ok, detail = hub_reachable()
    if not ok:
        raise ModelLoadError(
            f"{where} {why} and the hub is not reachable: {detail}. {_how_to_get(repo_id)}"
        )
    return HookedModel.from_pretrained(repo_id, **extra, **kwargs)
