"""Crop images keyed by image id, in a local directory or any fsspec filesystem (s3://, gs://, memory://)."""

from __future__ import annotations

import os
from pathlib import Path

from ootd.decode import check_image_id
from ootd.store.durable import write_atomically


class MediaStore:
    """Encoded crop bytes under `<root>/<id[:2]>/<id>.jpg`.

    Ids are validated before any path is built, so no caller text ever reaches the filesystem. Local writes go to
    a temporary name first and are renamed into place (`write_atomically`): a reader never sees a half-written
    file, and a synced put survives a power loss (the Index acknowledges an item only after its crop is stored).
    """

    def __init__(self, url: str | os.PathLike):
        """Opens (and for local paths creates) the store.

        Args:
            url: a directory path, or an fsspec URL such as `s3://bucket/media` or `memory://media`.

        Raises:
            ValueError: for an empty url.
        """
        text = str(url).strip()
        if not text:
            raise ValueError("media store url is empty: give a directory or an fsspec URL (store.media)")
        self.url = text
        if "://" in text and not text.startswith("file://"):
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(text)
            self._local: Path | None = None
        else:
            self._fs = None
            self._local = Path(text.removeprefix("file://")).expanduser().absolute()
            self._local.mkdir(parents=True, exist_ok=True)
            self._root = str(self._local)

    def path(self, image_id: str) -> str:
        """Where the bytes of `image_id` live (a local path or a path inside the fsspec filesystem)."""
        check_image_id(image_id)
        return f"{self._root.rstrip('/')}/{image_id[:2]}/{image_id}.jpg"

    def put(self, image_id: str, data: bytes, *, sync: bool = True) -> None:
        """Stores `data` under `image_id`, replacing what was there.

        Args:
            image_id: the item.
            data: encoded image bytes.
            sync: durable before returning (local stores); the index job, which can redo its work, passes False.

        Raises:
            ValueError: for a bad id or empty data.
        """
        target = self.path(image_id)
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ValueError(f"media for {image_id}: expected non-empty bytes")
        if self._fs is None:
            final = Path(target)
            final.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(final, bytes(data), sync=sync)
        else:
            self._fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self._fs.pipe_file(target, bytes(data))

    def get(self, image_id: str) -> bytes:
        """The stored bytes.

        Raises:
            ValueError: for a bad id.
            KeyError: when nothing is stored under the id.
        """
        target = self.path(image_id)
        try:
            if self._fs is None:
                return Path(target).read_bytes()
            return self._fs.cat_file(target)
        except FileNotFoundError:
            raise KeyError(image_id) from None

    def exists(self, image_id: str) -> bool:
        """Whether bytes are stored under the id.

        Raises:
            ValueError: for a bad id.
        """
        target = self.path(image_id)
        return Path(target).is_file() if self._fs is None else bool(self._fs.exists(target))

    def size(self, image_id: str) -> int | None:
        """Bytes stored under the id, or None when there are none.

        Raises:
            ValueError: for a bad id.
        """
        target = self.path(image_id)
        try:
            return Path(target).stat().st_size if self._fs is None else int(self._fs.size(target))
        except (FileNotFoundError, OSError):
            return None

    def delete(self, image_id: str) -> bool:
        """Removes the bytes of `image_id`; returns whether there were any.

        Raises:
            ValueError: for a bad id.
        """
        target = self.path(image_id)
        if self._fs is None:
            try:
                Path(target).unlink()
                return True
            except FileNotFoundError:
                return False
        try:
            self._fs.rm_file(target)
            return True
        except FileNotFoundError:
            return False

    def __repr__(self) -> str:
        return f"MediaStore({self.url!r})"

