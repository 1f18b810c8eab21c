"""Whether the Hugging Face hub can be used, decided in well under a second: offline, `transformers` and
`datasets` retry for about 30-40 s before they give up, so a run that cannot reach the hub must fail at once."""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request

CONNECT_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def declared_offline() -> str | None:
    """The offline variable the user set (the libraries then read only their local cache, at once), or None."""
    for name in _OFFLINE_VARS:
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    return None


def unreachable() -> str | None:
    """Why no TCP connection to the hub (or to the https proxy that would carry it) opens within a few seconds;
    None when one does."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"the hub ({host}:{port}) is unreachable: {exc.strerror or exc or type(exc).__name__}"
    return None
