"""Logging set-up for ootd's processes: called by the CLI and by actor/replica `__init__`s, never at import."""

from __future__ import annotations

import logging
import os

# Libraries that narrate their own start-up at INFO; their warnings still show.
_NARRATORS = ("faiss", "faiss.loader", "milvus_lite")


class _OpenClipChatter(logging.Filter):
    """open_clip narrates every model build at INFO on the root logger; keep its warnings, drop the narration."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def quiet_libraries(verbose: bool = False) -> None:
    """Silences library narration in this process (idempotent); `verbose` keeps everything."""
    if verbose:
        return
    root = logging.getLogger()
    if not any(isinstance(f, _OpenClipChatter) for f in root.filters):
        root.addFilter(_OpenClipChatter())
    # Embedded Milvus Lite serves gRPC inside this process and lacks AllocTimestamp, which pymilvus calls (and
    # tolerates) while creating an index; grpc would log each such call as a full server traceback.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    for name in _NARRATORS:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(verbose: bool = False) -> None:
    """The CLI's logging: timestamped lines on stderr at INFO (DEBUG with `verbose`), libraries quieted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libraries(verbose)
