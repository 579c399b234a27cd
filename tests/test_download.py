"""URL ingest: the download guard against a local HTTP server (unit), then one URL-manifest ingest on Ray.

Every request goes to a server this module starts on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ootd.decode import InputError
from ootd.ingest.download import Fetcher, FetchError, FetchPolicy, _retry_after, read_uri
from ootd.ingest.sources import list_inputs
from ootd.ingest.stages import hash_bytes
from tests.bad_images import truncated

CAP = 100_000  # body cap of these tests; the synthetic JPEGs are ~10-30 kB
STALL_S = 4.0


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class PhotoServer:
    """A threaded HTTP server whose paths misbehave on purpose; counts requests per path."""

    def __init__(self, photos: dict[str, bytes]):
        self.photos, self.hits = photos, Counter()
        self.release = threading.Event()  # set at shutdown so stalled handlers return
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                server.hits[self.path] += 1
                server.route(self, self.path, server.hits[self.path])

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients hanging up early is the point here
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, h: BaseHTTPRequestHandler, path: str, hit: int) -> None:
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/stall/"):
            self.release.wait(STALL_S)
            return self.send(h, 200, self.photos["good"])
        if path.startswith("/flaky/"):  # 500 twice, then the photo
            return self.send(h, 500, b"oops") if hit <= 2 else self.send(h, 200, self.photos["good2"])
        if path.startswith("/busy/"):  # 429 with Retry-After once, then the photo
            return self.send(h, 429, b"slow down", {"Retry-After": "1"}) if hit == 1 else \
                self.send(h, 200, self.photos["good3"])  # fmt: skip
        if path.startswith("/patience/"):
            return self.send(h, 503, b"later", {"Retry-After": "3600"})
        if path.startswith("/loop/"):
            return self.send(h, 302, b"", {"Location": path})
        if path.startswith("/hops/"):  # /hops/<n>/x.jpg: n redirects, then the photo
            n = int(path.split("/")[2])
            rest = "/".join(path.split("/")[3:])
            return self.send(h, 302, b"", {"Location": f"/hops/{n - 1}/{rest}"}) if n else \
                self.send(h, 200, self.photos["good"])  # fmt: skip
        if path.startswith("/to-other-host/"):
            return self.send(h, 302, b"", {"Location": self.url("/photo/good.jpg", host="127.0.0.2")})
        if path.startswith("/big-declared/"):
            return self.send(h, 200, b"\xff" * (CAP + 1))
        if path.startswith("/big-undeclared/"):  # HTTP/1.0, no Content-Length: the body ends when we close
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            for _ in range(CAP // 10_000 + 2):
                h.wfile.write(b"\xff" * 10_000)
            return None
        if path == "/html.jpg":
            return self.send(h, 200, b"<!doctype html><html><body>not a photo</body></html>")
        if path.startswith("/photo/") and Path(name).stem in self.photos:
            return self.send(h, 200, self.photos[Path(name).stem])
        return self.send(h, 404, b"no such photo")

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "image/jpeg")  # always claimed: ingest must not trust it
        h.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def photos(synthetic_set) -> dict[str, bytes]:
    files = sorted((synthetic_set / "images").rglob("*.jpg"))
    good = files[0].read_bytes()
    base = Image.open(io.BytesIO(good)).convert("RGB")
    return {
        "good": good, "good2": files[1].read_bytes(), "good3": files[2].read_bytes(),
        "same": files[3].read_bytes(),  # served under two URLs
        "half": jpeg(base.resize((128, 128), Image.Resampling.LANCZOS)),  # a near duplicate of `good`
        "truncated": truncated(files[4].read_bytes()), "local": files[5].read_bytes(),
    }  # fmt: skip


@pytest.fixture(scope="module")
def server(photos):
    srv = PhotoServer(photos)
    yield srv
    srv.close()


def fetcher(**overrides) -> Fetcher:
    policy = dict(max_bytes=CAP, connect_timeout_s=1.0, read_timeout_s=0.3, deadline_s=5.0, retries=2,
                  backoff_s=0.01, max_wait_s=5.0, allow_private_hosts=True)  # fmt: skip
    sleep = overrides.pop("sleep", time.sleep)
    policy.update(overrides)
    return Fetcher(FetchPolicy(**policy), per_host=4, sleep=sleep)


# ---------------------------------------------------------------- the download function (fast, no Ray)


def test_good_jpeg_is_fetched_byte_for_byte(server, photos):
    assert fetcher().fetch(server.url("/photo/good.jpg")) == photos["good"]


def test_stalled_server_times_out_and_is_transient(server):
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetcher().fetch(server.url("/stall/unit.jpg"))
    assert err.value.transient and err.value.stage == "download"
    assert "timed out" in str(err.value) and "gave up after 3 attempts" in str(err.value)
    assert server.hits["/stall/unit.jpg"] == 3
    assert time.monotonic() - started < STALL_S  # three 0.3 s read timeouts, not the server's stall


def test_404_fails_at_once(server):
    with pytest.raises(FetchError, match="HTTP 404") as err:
        fetcher().fetch(server.url("/photo/nothing-here.jpg"))
    assert not err.value.transient and server.hits["/photo/nothing-here.jpg"] == 1


def test_500_twice_then_200(server, photos):
    assert fetcher().fetch(server.url("/flaky/unit.jpg")) == photos["good2"]
    assert server.hits["/flaky/unit.jpg"] == 3


def test_429_honours_retry_after(server, photos):
    waits: list[float] = []
    assert fetcher(sleep=waits.append).fetch(server.url("/busy/unit.jpg")) == photos["good3"]
    assert waits == [1.0] and server.hits["/busy/unit.jpg"] == 2


def test_retry_after_beyond_the_limit_gives_up_transiently(server):
    with pytest.raises(FetchError, match="retry after 3600 s, over data.download_max_wait_s") as err:
        fetcher(sleep=lambda s: None).fetch(server.url("/patience/unit.jpg"))
    assert err.value.transient and server.hits["/patience/unit.jpg"] == 1


def test_retry_after_as_http_date():
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 100 < _retry_after({"Retry-After": future}) <= 121
    assert _retry_after({"Retry-After": "soon"}) is None and _retry_after({}) is None


def test_redirects_up_to_five_then_refused(server, photos):
    assert fetcher().fetch(server.url("/hops/5/ok.jpg")) == photos["good"]
    with pytest.raises(FetchError, match="too many redirects") as err:
        fetcher().fetch(server.url("/hops/6/ok.jpg"))
    assert not err.value.transient
    with pytest.raises(FetchError, match="too many redirects"):
        fetcher().fetch(server.url("/loop/unit"))
    assert server.hits["/loop/unit"] == 6  # the first request and five redirects, none retried


def test_byte_cap_with_and_without_content_length(server):
    with pytest.raises(FetchError, match="Content-Length.*over data.max_image_bytes"):
        fetcher().fetch(server.url("/big-declared/unit.jpg"))
    with pytest.raises(FetchError, match="stopped reading at") as err:
        fetcher().fetch(server.url("/big-undeclared/unit.jpg"))
    assert not err.value.transient


def test_content_is_sniffed_not_trusted(server, photos):
    html = fetcher().fetch(server.url("/html.jpg"))  # served as image/jpeg
    with pytest.raises(InputError, match="not an image") as err:
        hash_bytes(html, 10**8)
    assert err.value.stage == "decode"
    with pytest.raises(InputError, match="truncated") as err:
        hash_bytes(fetcher().fetch(server.url("/photo/truncated.jpg")), 10**8)
    assert err.value.stage == "decode"


def test_loopback_refused_unless_allowed(server):
    before = sum(server.hits.values())
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        with pytest.raises(FetchError, match="refused: .*loopback") as err:
            fetcher(allow_private_hosts=False).fetch(server.url("/photo/good.jpg", host=host))
        assert not err.value.transient
    assert sum(server.hits.values()) == before  # refused before connecting


def test_every_redirect_hop_is_checked(server, photos):
    # 127.0.0.1 allowed by network, 127.0.0.2 (also loopback) not: the redirect to it must be refused.
    only_one = fetcher(allow_private_hosts=False, allowed_networks=("127.0.0.1/32",))
    assert only_one.fetch(server.url("/photo/good.jpg")) == photos["good"]
    with pytest.raises(FetchError, match="refused: host '127.0.0.2' resolves to loopback"):
        only_one.fetch(server.url("/to-other-host/unit.jpg"))


@pytest.mark.parametrize("url, message", [
    ("http://", "no host"),
    ("ftp://127.0.0.1/photo.jpg", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("not a url at all", "malformed URL"),
    ("photos/a.jpg", "only http and https"),
    ("http://exa mple.com:99999/x.jpg", "malformed URL"),
])  # fmt: skip
def test_malformed_urls(url, message):
    with pytest.raises(FetchError, match=message) as err:
        fetcher().fetch(url)
    assert not err.value.transient


def test_unresolvable_host_is_final():
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    f = Fetcher(FetchPolicy(max_bytes=CAP), resolve=no_such_host)
    with pytest.raises(FetchError, match="cannot resolve host") as err:
        f.fetch("http://photos.invalid/a.jpg")
    assert not err.value.transient


def test_file_uri_is_read_through_pyarrow_fs(tmp_path, photos):
    (tmp_path / "Chic").mkdir()
    (tmp_path / "Chic" / "a.jpg").write_bytes(photos["good"])
    assert read_uri(f"file://{tmp_path}/Chic/a.jpg", CAP) == photos["good"]
    with pytest.raises(InputError, match="file not found"):
        read_uri(f"file://{tmp_path}/Chic/b.jpg", CAP)
    with pytest.raises(InputError, match="over data.max_image_bytes"):
        read_uri(f"file://{tmp_path}/Chic/a.jpg", 10)
    listed = list_inputs(f"file://{tmp_path}")
    assert [(i.source, i.style, i.kind) for i in listed] == [(f"file://{tmp_path}/Chic/a.jpg", "Chic", "uri")]


def test_url_manifests_csv_parquet_jsonl(tmp_path):
    rows = [{"url": "https://a.example/1.jpg", "style": "Chic"}, {"url": "not a url", "style": None},
            {"url": None, "path": "rel/2.jpg", "style": "Retro"}, {"path": "file:///abs/3.jpg"}]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("m.csv", "m.parquet", "m.jsonl"):
        listed = {(i.source, i.style, i.kind) for i in list_inputs(tmp_path / name)}
        assert listed == {("https://a.example/1.jpg", "Chic", "url"), ("not a url", None, "url"),
                          (str(tmp_path / "rel" / "2.jpg"), "Retro", "path"),
                          ("file:///abs/3.jpg", None, "uri")}, name  # fmt: skip


# ---------------------------------------------------------------- one URL-manifest ingest on the Ray cluster


def read_table(out: Path, name: str) -> pd.DataFrame:
    files = sorted((out / name).glob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) if files else pd.DataFrame(
        columns=["source", "stage", "error", "transient"])


@pytest.fixture(scope="module")
def url_run(ray_session, server, photos, tiny_config, tmp_path_factory):
    """One manifest with every kind of URL, ingested twice; then one loopback URL with the guard on."""
    from ootd.config import with_overrides
    from ootd.ingest.pipeline import run_ingest

    root = tmp_path_factory.mktemp("url-ingest")
    (root / "local").mkdir()
    (root / "local" / "uri.jpg").write_bytes(photos["local"])
    urls = {
        "good": server.url("/photo/good.jpg"), "half": server.url("/photo/half.jpg"),
        "stall": server.url("/stall/e2e.jpg"), "missing": server.url("/photo/gone.jpg"),
        "flaky": server.url("/flaky/e2e.jpg"), "busy": server.url("/busy/e2e.jpg"),
        "loop": server.url("/loop/e2e"), "big": server.url("/big-declared/e2e.jpg"),
        "big_stream": server.url("/big-undeclared/e2e.jpg"), "html": server.url("/html.jpg"),
        "truncated": server.url("/photo/truncated.jpg"), "malformed": "http://",
        "dup_a": server.url("/photo/same.jpg"), "dup_b": server.url("/photo/same.jpg?copy=2"),
    }  # fmt: skip
    rows = [{"url": url, "style": "Chic"} for url in urls.values()]
    rows.append({"path": f"file://{root}/local/uri.jpg", "style": "Retro"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = with_overrides(tiny_config, [
        "data.allow_private_hosts=true", f"data.max_image_bytes={CAP}", "data.download_read_timeout_s=0.5",
        "data.download_retries=2", "data.download_backoff_s=0.05", "data.download_concurrency=8",
    ])  # fmt: skip
    out = root / "out"
    first = run_ingest(cfg, manifest, out)
    tables = {"crops": read_table(out, "crops"), "errors": read_table(out, "errors")}
    hits_first = Counter(server.hits)
    second = run_ingest(cfg, manifest, out)
    hits_second = server.hits - hits_first
    guarded_manifest = root / "guarded.csv"
    pd.DataFrame({"url": [server.url("/photo/good.jpg", host="localhost")]}).to_csv(guarded_manifest, index=False)
    guarded = run_ingest(with_overrides(cfg, ["data.allow_private_hosts=false"]), guarded_manifest, root / "g")
    return {"first": first, "second": second, "out": out, "urls": urls, "uri": f"file://{root}/local/uri.jpg",
            "hits_second": hits_second, "guarded": guarded, "guarded_errors": read_table(root / "g", "errors"),
            **tables}  # fmt: skip


EXPECTED_ERRORS = {  # name -> (stage, part of the message, transient)
    "stall": ("download", "timed out", True), "missing": ("download", "HTTP 404", False),
    "loop": ("download", "too many redirects", False), "big": ("download", "Content-Length", False),
    "big_stream": ("download", "stopped reading", False), "html": ("decode", "not an image", False),
    "truncated": ("decode", "truncated", False), "malformed": ("download", "no host", False),
}  # fmt: skip


@pytest.mark.slow
def test_every_url_lands_in_exactly_one_table(url_run):
    crops, errors, urls = url_run["crops"], url_run["errors"], url_run["urls"]
    assert crops.source.is_unique and errors.source.is_unique
    assert not set(crops.source) & set(errors.source)
    expected_crops = {urls[n] for n in ("good", "half", "flaky", "busy", "dup_a")} | {url_run["uri"]}
    assert set(crops.source) == expected_crops
    assert set(errors.source) == {urls[n] for n in EXPECTED_ERRORS}
    for name, (stage, message, transient) in EXPECTED_ERRORS.items():
        row = errors.set_index("source").loc[urls[name]]
        assert row.stage == stage and message in row.error and bool(row.transient) == transient, (name, row.error)
    summary = url_run["first"]
    assert summary["inputs"] == 15 == summary["rows"] + summary["errors"] + summary["duplicates"]
    assert (summary["rows"], summary["errors"], summary["duplicates"], summary["transient_errors"]) == (6, 8, 1, 1)
    assert summary["errors_by_stage"] == {"decode": 2, "download": 6}


@pytest.mark.slow
def test_url_rows_carry_the_url_and_the_sha256_of_the_body(url_run, photos):
    crops = url_run["crops"].set_index("source")
    for name, key in (("good", "good"), ("flaky", "good2"), ("busy", "good3"), ("half", "half")):
        assert crops.loc[url_run["urls"][name], "image_id"] == hashlib.sha256(photos[key]).hexdigest()
    assert crops.loc[url_run["uri"], "style"] == "Retro"


@pytest.mark.slow
def test_same_photo_under_two_urls_is_one_row(url_run):
    urls = url_run["urls"]
    assert (urls["dup_b"] not in set(url_run["crops"].source)) and (urls["dup_b"] not in set(url_run["errors"].source))
    assert url_run["first"]["duplicate_examples"] == [[urls["dup_b"], urls["dup_a"]]]


@pytest.mark.slow
def test_near_duplicates_are_grouped(url_run):
    crops = url_run["crops"].set_index("source")
    good, half = crops.loc[url_run["urls"]["good"]], crops.loc[url_run["urls"]["half"]]
    rep, member = sorted([good, half], key=lambda r: r.image_id)
    assert pd.isna(rep.near_dup_of) and member.near_dup_of == rep.image_id
    others = crops.drop(index=[url_run["urls"]["good"], url_run["urls"]["half"]])
    assert others.near_dup_of.isna().all()
    assert all(len(h) == 36 for h in crops.phash) and all(len(w) == 5 for w in crops.phash_windows)
    assert url_run["first"]["near_duplicates"] == 1


@pytest.mark.slow
def test_rerun_adds_no_row_and_only_retries_the_transient_failure(url_run):
    second, out = url_run["second"], url_run["out"]
    assert (second["rows"], second["retried"], second["errors"], second["transient_errors"]) == (0, 1, 1, 1)
    assert second["downloads"] == {"fetched": 1, "reused": 1}  # the stalled URL again; the duplicate from fetched/
    assert set(url_run["hits_second"]) == {"/stall/e2e.jpg"}  # nothing else was requested
    assert len(read_table(out, "crops")) == len(url_run["crops"])
    errors = read_table(out, "errors")
    assert len(errors) == len(url_run["errors"]) and errors.source.is_unique  # the old transient row superseded
    assert not (out / "downloads").exists()


@pytest.mark.slow
def test_loopback_url_refused_with_the_guard_on(url_run):
    errors = url_run["guarded_errors"]
    assert len(errors) == 1 and errors.iloc[0].stage == "download"
    assert "refused" in errors.iloc[0].error and "loopback" in errors.iloc[0].error
    assert (url_run["guarded"]["rows"], url_run["guarded"]["errors"]) == (0, 1)


def test_transient_errors_are_retried_and_superseded(tmp_path):
    """Bookkeeping without Ray: which sources a run redoes, and how old transient rows give way to new outcomes."""
    from ootd.ingest.pipeline import _supersede_transient, read_state
    from ootd.tables import write_rows

    out = tmp_path / "out"
    (out / "errors").mkdir(parents=True)
    old = [{"source": "http://h/stall.jpg", "stage": "download", "error": "timed out", "transient": True},
           {"source": "http://h/404.jpg", "stage": "download", "error": "HTTP 404", "transient": False},
           {"source": "http://h/later.jpg", "stage": "download", "error": "HTTP 503", "transient": True}]
    write_rows(old, out / "errors" / "20200101T000000-aaaaaa-0.parquet", "errors")
    # A file written before the `transient` column: its errors are final.
    pq.write_table(pa.table({"source": ["/p/a.jpg"], "stage": ["read"], "error": ["file not found"]}),
                   out / "errors" / "20190101T000000-bbbbbb-0.parquet")
    done = read_state(out)
    assert done.sources == {"http://h/404.jpg", "/p/a.jpg"}
    assert done.transient == {"http://h/stall.jpg", "http://h/later.jpg"}
    # This run retried stall.jpg and failed transiently again; later.jpg was not in its inputs.
    new = [{"source": "http://h/stall.jpg", "stage": "download", "error": "timed out", "transient": True}]
    write_rows(new, out / "errors" / "20210101T000000-cccccc-0.parquet", "errors")
    _supersede_transient(out, "20210101T000000-cccccc", {"http://h/stall.jpg"})
    errors = read_table(out, "errors")
    assert sorted(errors.source) == ["/p/a.jpg", "http://h/404.jpg", "http://h/later.jpg", "http://h/stall.jpg"]
    assert len(errors) == 4


@pytest.mark.slow
def test_resume_uses_staged_downloads(ray_session, server, photos, tiny_config, tmp_path):
    """A run killed between the passes left fetched/ and downloads/: the next run fetches nothing."""
    from ootd.config import with_overrides
    from ootd.ingest.pipeline import _fetched_schema, run_ingest
    from ootd.ingest.stages import stage_blob

    url = server.url("/photo/good2.jpg?staged=1")
    out = tmp_path / "out"
    key, phash = hash_bytes(photos["good2"], 10**8)
    stage_blob(out / "downloads", key, photos["good2"])
    (out / "fetched").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"source": url, "image_id": key, **phash.columns()}],
                                        schema=_fetched_schema()), out / "fetched" / "x.parquet")
    (tmp_path / "m.csv").write_text(f"url,style\n{url},Chic\n")
    summary = run_ingest(with_overrides(tiny_config, ["data.allow_private_hosts=true"]), tmp_path / "m.csv", out)
    assert (summary["rows"], summary["downloads"]) == (1, {"fetched": 0, "reused": 1})
    assert server.hits["/photo/good2.jpg?staged=1"] == 0
    crops = read_table(out, "crops")
    assert crops.source.tolist() == [url] and crops.image_id.tolist() == [key]
    assert not (out / "downloads").exists()
