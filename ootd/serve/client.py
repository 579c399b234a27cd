"""The few client calls the `ootd` command itself makes against a running server."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


class Stop(BaseException):
    """SIGTERM or SIGINT arrived: unwinds whatever the main thread was doing (a BaseException, like
    KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise `Stop` in the main thread; the previous handlers after it.

    Installed after `ray.init`, whose driver handler would otherwise take SIGTERM: it dumps a stack trace and
    exits 15, leaving the detached Serve app running.
    """

    def on_signal(signum: int, _frame: Any) -> None:
        raise Stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python (Ray's); the default then, so a second signal still stops.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def serve_until_interrupted(deploy: Callable[[], Any] | None = None) -> int:
    """Runs `deploy` (if given), then keeps this driver and its Serve app alive until SIGTERM or SIGINT, then
    shuts Serve down and returns.

    SIGTERM is what systemd, Kubernetes and `docker stop` send: it drains like Ctrl-C. `serve.shutdown()` stops
    the proxies taking new requests and lets each replica finish its in-flight ones (Serve's graceful shutdown)
    before it returns. A signal during `deploy` stops the deployment and shuts down what was started; a second
    signal while draining gets the default handling.

    Args:
        deploy: what starts the app (under the same signal handling), e.g. `run_app` and a message.

    Returns:
        The number of the signal that stopped it.
    """
    from ray import serve

    try:
        with stop_on_signals():
            if deploy is not None:
                deploy()
            while True:
                time.sleep(3600)
    except Stop as stop:
        signum = stop.signum
    log.info("received %s: draining and shutting the app down", signal.Signals(signum).name)
    serve.shutdown()
    log.info("the app is shut down")
    return signum
