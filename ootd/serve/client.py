"""The few client calls the `ootd` command itself makes against a running server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def search_by_photo(url: str, image: Path, top_k: int = 10, styles: Sequence[str] = (),
                    timeout: float = 120) -> list[dict[str, Any]]:
    """POST /v1/search with a photo; the hits, best first.

    Raises:
        RuntimeError: the server answered with an error (its status and message).
    """
    import requests

    fields = {"top_k": str(top_k)}
    if styles:
        fields["styles"] = ",".join(styles)
    with image.open("rb") as handle:
        resp = requests.post(f"{url}/v1/search", files={"image": (image.name, handle)}, data=fields, timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"error {resp.status_code}: {resp.text}")
    return resp.json()["results"]


def serve_until_interrupted() -> None:
    """Keeps this driver (and so the Serve app it deployed) alive until Ctrl-C, then shuts Serve down."""
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
