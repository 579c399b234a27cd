"""Fetching untrusted photo URLs (urllib3) and filesystem URIs (pyarrow.fs) for ingest, one clear error per input.

HTTP(S) downloads are guarded the way a crawler must be: only http/https; the host is resolved here and every
address checked (no loopback, private, link-local or otherwise non-global address unless
`data.allow_private_hosts` or `data.allowed_private_networks` says so), then the connection is made to exactly
the checked address (the Host header and TLS name stay the URL's), so a DNS answer that changes between check
and connect cannot redirect it; every redirect hop (at most `MAX_REDIRECTS`) is checked the same way. Bodies are
read as a stream and cut at `data.max_image_bytes` whatever Content-Length says; no compression is requested.
The Content-Type header is ignored: the caller sniffs the bytes (`ootd.decode.probe`).

Timeouts, connection failures, 408, 429 and 5xx are retried with exponential backoff (honouring Retry-After);
other 4xx fail at once. A failure that might pass on a later run is marked `transient`, so the next ingest run
retries it instead of treating it as final.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from ootd.decode import READ, InputError, read_capped

if TYPE_CHECKING:
    from ootd.config import DataConfig

DOWNLOAD = "download"  # stage named in the errors table
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
USER_AGENT = "ootd-ingest/0.1 (+https://github.com/ootd)"
# Filesystem URI schemes read through pyarrow.fs (or fsspec for schemes pyarrow lacks).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "memory")


def is_url(source: str) -> bool:
    """Whether `source` is fetched over HTTP (an http:// or https:// URL)."""
    return source[:8].lower().startswith(("http://", "https://"))


def is_uri(source: str) -> bool:
    """Whether `source` is a filesystem URI (`file://`, `s3://`, ...) read through pyarrow.fs / fsspec."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() in URI_SCHEMES


class FetchError(InputError):
    """A URL could not be fetched; `transient` when a later run may succeed (timeouts, 429, 5xx, refused)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(DOWNLOAD, message)
        self.transient = transient


class _Retry(Exception):
    """One attempt failed in a way worth retrying; `wait` is the server's Retry-After in seconds, if any."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one download (the `data.download_*` settings).

    Attributes:
        max_bytes: largest body accepted (`data.max_image_bytes`).
        connect_timeout_s: TCP/TLS connect timeout.
        read_timeout_s: longest wait for any single read from the socket.
        deadline_s: longest one attempt may take in all (a server trickling bytes defeats a read timeout).
        retries: further attempts after a retryable failure.
        backoff_s: first backoff; doubled each retry, with jitter.
        max_wait_s: a Retry-After longer than this ends the retries (the error stays transient).
        allow_private_hosts: fetch from loopback/private/link-local addresses too.
        allowed_networks: CIDRs fetched even when private (e.g. an internal image CDN).
    """

    max_bytes: int
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    deadline_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0
    allow_private_hosts: bool = False
    allowed_networks: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig) -> FetchPolicy:
        """The policy of a config's data section."""
        return cls(
            max_bytes=data.max_image_bytes, connect_timeout_s=data.download_connect_timeout_s,
            read_timeout_s=data.download_read_timeout_s, deadline_s=data.download_deadline_s,
            retries=data.download_retries, backoff_s=data.download_backoff_s, max_wait_s=data.download_max_wait_s,
            allow_private_hosts=data.allow_private_hosts, allowed_networks=tuple(data.allowed_private_networks),
        )  # fmt: skip


class Fetcher:
    """Downloads URLs under a `FetchPolicy`, at most `per_host` requests at a time to one host (thread-safe)."""

    def __init__(
        self,
        policy: FetchPolicy,
        per_host: int = 4,
        *,
        resolve: Callable[..., list] = socket.getaddrinfo,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """Checks the allowed networks and sets up empty connection pools.

        Args:
            policy: limits of each download.
            per_host: concurrent requests to one host (host:port) from this fetcher.
            resolve: `socket.getaddrinfo` (tests may pass a stub).
            sleep: `time.sleep` (tests may pass a recorder).

        Raises:
            ValueError: for an allowed network that is not a CIDR.
        """
        self.policy, self.per_host = policy, max(1, per_host)
        self._resolve, self._sleep = resolve, sleep
        try:
            self._allowed = [ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks]
        except ValueError as exc:
            raise ValueError(f"data.allowed_private_networks: {exc}") from None
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._pools: dict[tuple, Any] = {}

    def fetch(self, url: str) -> bytes:
        """The body of `url`, following redirects, retrying what may pass.

        Raises:
            FetchError: stage `download`, with `transient` set when a later run may succeed.
        """
        policy = self.policy
        for attempt in range(policy.retries + 1):
            try:
                return self._follow(url)
            except _Retry as exc:
                reason = str(exc)
                if attempt == policy.retries:
                    break
                wait = exc.wait if exc.wait is not None else policy.backoff_s * 2**attempt * random.uniform(0.5, 1)
                if wait > policy.max_wait_s:
                    raise FetchError(f"{reason}; server asked to retry after {wait:.0f} s, over "
                                     f"data.download_max_wait_s={policy.max_wait_s:g}", transient=True) from None
                self._sleep(wait)
        raise FetchError(f"{reason} (gave up after {policy.retries + 1} attempts)", transient=True)

    def close(self) -> None:
        """Closes every pooled connection."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _follow(self, url: str) -> bytes:
        seen = [url]
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self._get(seen[-1])
            if body is not None:
                return body
            if location is None:
                raise FetchError(f"HTTP {status} redirect without a Location header")
            seen.append(location)
        raise FetchError(f"too many redirects (over {MAX_REDIRECTS}): {' -> '.join(seen[:3])} -> ...")

    def _get(self, url: str) -> tuple[int, str | None, bytes | None]:
        """One request: (status, absolute redirect target or None, body or None for a redirect)."""
        import urllib3
        from urllib3.exceptions import HTTPError, SSLError, TimeoutError

        scheme, host, port, target = _split(url)
        address = self._address(host, port)
        host_slot = self._slot(f"{host}:{port}")
        with host_slot:
            started = time.monotonic()
            try:
                response = self._pool(scheme, address, port, host).urlopen(
                    "GET", target, headers=_headers(host, port, scheme), redirect=False, retries=False,
                    preload_content=False, assert_same_host=False, release_conn=False,
                    timeout=urllib3.Timeout(connect=self.policy.connect_timeout_s, read=self.policy.read_timeout_s),
                )  # fmt: skip
            except SSLError as exc:
                raise FetchError(f"TLS error for {host}: {exc}") from None
            except TimeoutError:
                raise _Retry(f"timed out connecting to or waiting for {host}") from None
            except HTTPError as exc:
                raise _Retry(f"connection to {host} failed: {type(exc).__name__}") from None
            try:
                return self._handle(response, url, started)
            finally:
                response.close()
                response.release_conn()

    def _handle(self, response: Any, url: str, started: float) -> tuple[int, str | None, bytes | None]:
        from urllib.parse import urljoin

        status = response.status
        if status in REDIRECT_STATUSES:
            location = response.headers.get("Location")
            return status, urljoin(url, location) if location else None, None
        if status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status} {response.reason or ''}".rstrip(), _retry_after(response.headers))
        if status != 200:
            raise FetchError(f"HTTP {status} {response.reason or ''}".rstrip())
        return status, None, self._body(response, started)

    def _body(self, response: Any, started: float) -> bytes:
        from urllib3.exceptions import HTTPError, TimeoutError

        cap = self.policy.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > cap:
            raise FetchError(f"body is {int(declared):,} bytes (Content-Length), over data.max_image_bytes={cap:,}; "
                             "not read")  # fmt: skip
        chunks, size = [], 0
        try:
            for chunk in response.stream(CHUNK_BYTES, decode_content=True):
                size += len(chunk)
                if size > cap:
                    raise FetchError(f"body is over data.max_image_bytes={cap:,}; stopped reading at {size:,} bytes")
                if time.monotonic() - started > self.policy.deadline_s:
                    raise _Retry(f"download took over data.download_deadline_s={self.policy.deadline_s:g}")
                chunks.append(chunk)
        except TimeoutError:
            raise _Retry(f"read timed out after {size:,} bytes") from None
        except HTTPError as exc:
            raise _Retry(f"connection broken after {size:,} bytes: {type(exc).__name__}") from None
        return b"".join(chunks)

    def _address(self, host: str, port: int) -> str:
        """The checked address to connect to: every address `host` resolves to must be allowed."""
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            # EAI_AGAIN is a resolver hiccup; "no such host" is the URL's own fault.
            raise FetchError(f"cannot resolve host {host!r}: {exc.strerror or exc}",
                             transient=exc.errno == socket.EAI_AGAIN) from None  # fmt: skip
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise FetchError(f"host {host!r} resolves to no address")
        for address in addresses:
            refused = self._refusal(address)
            if refused:
                raise FetchError(f"refused: host {host!r} resolves to {refused} address {address} (set "
                                 "data.allow_private_hosts or data.allowed_private_networks to fetch from it)")
        return addresses[0]

    def _refusal(self, address: str) -> str | None:
        """Why `address` may not be fetched from (e.g. "loopback"), or None when it may."""
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
        if self.policy.allow_private_hosts or any(ip in net for net in self._allowed):
            return None
        for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
            if getattr(ip, f"is_{kind}"):
                return kind.replace("_", "-")
        return None if ip.is_global else "non-global"

    def _slot(self, key: str) -> threading.BoundedSemaphore:
        with self._lock:
            if key not in self._hosts:
                self._hosts[key] = threading.BoundedSemaphore(self.per_host)
            return self._hosts[key]

    def _pool(self, scheme: str, address: str, port: int, host: str) -> Any:
        import urllib3

        key = (scheme, address, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                if scheme == "https":
                    # Connect to the checked address; verify the certificate against the URL's host name.
                    pool = urllib3.HTTPSConnectionPool(address, port, maxsize=self.per_host, server_hostname=host,
                                                       assert_hostname=host, cert_reqs="CERT_REQUIRED")
                else:
                    pool = urllib3.HTTPConnectionPool(address, port, maxsize=self.per_host)
                self._pools[key] = pool
            return pool


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL.

    Raises:
        FetchError: for a malformed URL or another scheme.
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        parsed = parse_url(url.strip())
    except (LocationParseError, ValueError) as exc:
        raise FetchError(f"malformed URL {url!r}: {exc}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL {url!r}: only http and https are fetched")
    if not parsed.host:
        raise FetchError(f"malformed URL {url!r}: no host")
    host = parsed.host.strip("[]").lower()
    return scheme, host, parsed.port or (443 if scheme == "https" else 80), parsed.request_uri or "/"


def _headers(host: str, port: int, scheme: str) -> dict[str, str]:
    default = 443 if scheme == "https" else 80
    name = f"[{host}]" if ":" in host else host
    return {
        "Host": name if port == default else f"{name}:{port}",
        "User-Agent": USER_AGENT,
        "Accept": "image/*,*/*;q=0.5",
        "Accept-Encoding": "identity",  # a compressed body could inflate past the byte cap
    }


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def read_uri(uri: str, max_bytes: int) -> bytes:
    """Reads a whole file named by a filesystem URI (`file://`, `s3://`, `gs://`, ...), refusing oversized ones.

    pyarrow.fs handles the schemes it knows (local, S3, GCS, HDFS, Azure); fsspec, when installed, the others.

    Raises:
        InputError: stage `read` for a missing, unreadable or oversized file, or an unknown filesystem.
    """
    size, stream = _open_uri(uri)
    return read_capped(stream, size, uri, max_bytes)


def _open_uri(uri: str) -> tuple[int | None, Callable[[], Any]]:
    """(size or None, opener) of a URI through pyarrow.fs, else fsspec."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        filesystem = None
    except OSError as exc:  # e.g. credentials or region lookups failing for s3://
        raise InputError(READ, f"cannot open {uri}: {exc}") from None
    if filesystem is not None:
        try:
            info = filesystem.get_file_info(path)
        except OSError as exc:
            raise InputError(READ, f"cannot read {uri}: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(READ, f"file not found: {uri}")
        if info.type != pafs.FileType.File:
            raise InputError(READ, f"not a regular file: {uri}")
        return info.size, lambda: filesystem.open_input_stream(path)
    try:
        import fsspec
    except ImportError:
        raise InputError(READ, f"no filesystem for {uri}: unknown to pyarrow, and fsspec is not installed") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isfile(path):
            raise InputError(READ, f"file not found: {uri}")
        return fs.size(path), lambda: fs.open(path, "rb")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types
        raise InputError(READ, f"cannot open {uri}: {type(exc).__name__}: {exc}") from None
