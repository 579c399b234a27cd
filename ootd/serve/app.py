"""Ray Serve deployments of ootd (Ingress → Encoder, Index) and the builders `build_app` / `run_app`.

The Index deployment lives in `ootd.serve.index_deployment` (re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve

from ootd.config import Config, absolute_paths, load_config
from ootd.logs import quiet_libraries
from ootd.model.modeldir import model_info
from ootd.placement import device_gpus, resolve_device
from ootd.serve.api import ApiSettings, SearchFilters, create_api
from ootd.serve.backend import Unavailable
from ootd.serve.index_deployment import Index
from ootd.serve.pipeline import OutfitPipeline
from ootd.store.milvus import is_server_uri

log = logging.getLogger(__name__)

APP_NAME = "ootd"
RETRY_AFTER_S = 1.0


def resolve_model_dir(config: Config, model_dir: str | Path | None, live_version: str | None) -> Path:
    """The model dir to serve: the explicit one, `serve.model_dir`, or `<workdir>/models/<live version>`.

    Raises:
        Unavailable: when nothing is given and no collection is live.
        FileNotFoundError: when the dir is not an exported model.
    """
    chosen = str(model_dir or config.serve.model_dir or "")
    if not chosen:
        if not live_version:
            raise Unavailable("no model to serve: no live Milvus collection yet (run `ootd index`) and "
                              "serve.model_dir is empty")
        chosen = str(Path(config.data.workdir) / "models" / live_version)
    path = Path(chosen).expanduser().absolute()
    model_info(path)  # fails early with the fix when it is not an export
    return path


class Batcher:
    """Runs `fn` on batches of concurrent calls, one batch at a time, each taking every call that queued while the
    previous one ran (up to `max_size`): a busy replica runs full batches, a lone request waits at most `wait_s`.

    Why not `@serve.batch`: its loop forms the next batch while the current one still runs (Ray 2.60
    `batching.py` `_process_batches`), so under load batches leave after `batch_wait_timeout_s` with the one or
    two requests that came in meanwhile and queue behind each other (measured: benchmarks/results/serve_load.md).
    """

    def __init__(self, fn: Any, max_size: int, wait_s: float = 0.0):
        """Args:
        fn: list of items → list of results (same length, same order); runs off the event loop.
        max_size: most items in one call.
        wait_s: how long a batch that starts on an idle replica waits for more items.
        """
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        if self.wait_s and len(self._queue) < self.max_size:
            await asyncio.sleep(self.wait_s)
        while self._queue:
            batch, self._queue = self._queue[: self.max_size], self._queue[self.max_size:]
            batch = [(item, future) for item, future in batch if not future.done()]  # cancelled: client left
            if not batch:
                continue
            try:
                # Off the event loop: requests keep arriving (and queueing for the next batch) while it runs.
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def encoder_threads(config: Config) -> int:
    """torch threads of one Encoder replica: `serve.encoder_threads`, else its CPU reservation rounded up."""
    return config.serve.encoder_threads or max(1, math.ceil(config.serve.encoder_num_cpus))


@serve.deployment
class Encoder:
    """Detector + style encoder; concurrent requests are batched into one forward pass."""

    async def __init__(self, config: Config, model_dir: str, index: Any):
        """Loads the pipeline; without a model dir, asks the Index which model the live collection holds."""
        import torch

        quiet_libraries()
        # torch defaults to one thread per core of the machine, whatever share of it the replica holds; the
        # detector runtime takes the same count (ootd.detect.yolo).
        torch.set_num_threads(encoder_threads(config))
        live = None if model_dir or config.serve.model_dir else await index.model_version.remote()
        path = resolve_model_dir(config, model_dir, live)
        # `make_app` resolved `auto` against the cluster and reserved the GPU a cuda device needs.
        self.pipeline = await asyncio.to_thread(OutfitPipeline, config, path, config.model.device)
        self.model_dir = str(path)
        self._batch = Batcher(self._run, config.serve.max_batch_size, config.serve.batch_wait_timeout_s)
        log.info("encoder %s ready (model dir %s, encoder on %s/%s, detector on %s/%s, %d torch threads)",
                 self.pipeline.model_version, path, config.model.device, self.pipeline.embedder.name,
                 config.detect.device, self.pipeline.detector.runtime.name, torch.get_num_threads())

    def info(self) -> dict[str, Any]:
        """The model this replica serves."""
        return {"model_version": self.pipeline.model_version, "embed_dim": self.pipeline.embed_dim,
                "model_dir": self.model_dir}

    async def embed(self, image: bytes, want_crop: bool = False) -> dict[str, Any]:
        """Embeds one photo (batched with concurrent calls)."""
        return await self._batch((image, want_crop))

    def _run(self, items: list[tuple[bytes, bool]]) -> list[dict[str, Any]]:
        return self.pipeline.run([i[0] for i in items], [i[1] for i in items])


def _checked(result: Any) -> Any:
    """A deployment's result; its `error` dicts become a 4xx (bad input, `status` < 500) or Unavailable (503)."""
    if isinstance(result, dict) and "error" in result:
        status = int(result.get("status", 503))
        if status < 500:
            from fastapi import HTTPException

            raise HTTPException(status, result["error"])
        raise Unavailable(result["error"])
    return result


async def _with_retry(call: Any, *args: Any, what: str = "the index") -> Any:
    """`call.remote(*args)`, retried once when the replica died or is restarting (reads, embeddings, and writes
    idempotent by content id); still failing is Unavailable (a 503 with Retry-After), never a 500.

    Args:
        call: a deployment handle method.
        *args: its arguments.
        what: the deployment, named in the 503's message.
    """
    from ray.exceptions import ActorUnavailableError, RayActorError

    for attempt in range(2):
        try:
            return await call.remote(*args)
        except (RayActorError, ActorUnavailableError) as exc:
            # RayActorError covers ActorDiedError: the replica process is gone with the request it held.
            if attempt:
                raise Unavailable(f"{what} is restarting ({type(exc).__name__}): retry shortly") from None
            await asyncio.sleep(RETRY_AFTER_S)
    raise AssertionError("unreachable")


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_write_protection(config: Config) -> None:
    """Refuses to expose open writes: a non-loopback `serve.host` needs an API key or `serve.allow_open_writes`.

    Raises:
        ValueError: with the fix, when anyone who can reach the port could add or delete items.
    """
    s = config.serve
    if s.api_key or s.allow_open_writes or is_loopback(s.host):
        return
    raise ValueError(f"serve.host={s.host} is reachable from other machines and no API key is set, so anyone could "
                     "add or delete items: set OOTD_API_KEY in the environment (or serve.api_key), or "
                     "--set serve.allow_open_writes=true on a network that is private by other means")


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP front: validation, limits, decoding (see `ootd.serve.api`); work goes to Encoder and Index."""

    def __init__(self, config: Config, encoder: Any, index: Any):
        from ootd.store.media import MediaStore

        quiet_libraries()
        self.config, self.encoder, self.index = config, encoder, index
        self.media = MediaStore(config.store.media)
        self.settings = ApiSettings(embed_dim=config.model.embed_dim, api_key=config.serve.api_key,
                                    max_image_bytes=config.serve.max_image_bytes,
                                    max_image_pixels=config.serve.max_image_pixels)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self, self.settings)

    async def embed(self, image: bytes, want_crop: bool = False) -> dict[str, Any]:
        # Idempotent (the same bytes, the same vector): retried once on a replica that died under it.
        result = await _with_retry(self.encoder.embed, image, want_crop, what="the encoder")
        if "error" in result:  # the ingress checked only the header: corrupt pixel data surfaces here
            from fastapi import HTTPException

            raise HTTPException(int(result.get("status", 422)), result["error"])
        return result

    async def search(self, vector: list[float], filters: SearchFilters, model_version: str | None = None
                     ) -> dict[str, Any]:
        query = {"vector": vector, "top_k": filters.top_k, "styles": filters.styles,
                 "exclude_ids": filters.exclude_ids, "model_version": model_version,
                 "collapse": filters.collapse_near_duplicates}
        return _checked(await _with_retry(self.index.search, query))

    async def get(self, ids: list[str]) -> list[dict[str, Any]]:
        return _checked(await _with_retry(self.index.get, ids))

    async def upsert(self, row: dict[str, Any], crop: bytes, model_version: str) -> None:
        # The Index stores the crop, logs and commits the row: one writer, durable before it answers.
        _checked(await _with_retry(self.index.upsert, row, crop, model_version))

    async def delete(self, image_id: str) -> bool:
        return bool(_checked(await _with_retry(self.index.delete, image_id))["deleted"])

    async def read_image(self, image_id: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self.media.get, image_id)
        except KeyError:
            return None

    async def stats(self) -> dict[str, Any]:
        return _checked(await _with_retry(self.index.stats))

    async def ready(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ready": False}
        try:
            info = await asyncio.wait_for(self.encoder.info.remote(), timeout=10)
            state["model_version"] = info["model_version"]
        except Exception as exc:
            state["reason"] = f"encoder not ready: {exc}"
            return state
        try:
            ok = await asyncio.wait_for(self.index.ping.remote(), timeout=10)
            live = await asyncio.wait_for(self.index.model_version.remote(), timeout=10)
        except Exception as exc:
            state["reason"] = f"index not ready: {exc}"
            return state
        state["live_model_version"] = live
        if not ok:
            state["reason"] = "Milvus does not answer"
        elif live != info["model_version"]:
            state["reason"] = f"the live collection holds model {live}, the encoder serves {info['model_version']}"
        else:
            state["ready"] = True
        return state


def index_batch_size(config: Config) -> int:
    """Most searches the Index merges into one Milvus call (vectors are small; Milvus handles many at once)."""
    return max(64, 4 * config.serve.max_batch_size)


# Ray Serve reads these when a process imports it, so they go to the controller (which starts the proxy, and the
# proxy inherits them) and into every replica's runtime_env. They are what RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets
# (Ray 2.60 `serve/_private/constants.py`) except direct ingress on its own (HAPROXY_ENV turns it on behind
# HAProxy, which keeps `serve.port`); RAY_SERVE_LOG_TO_STDERR=0, which would hide replica errors from the
# console; and RAY_SERVE_USE_GRPC_BY_DEFAULT=1 (gRPC between deployments), which saved ~1 ms CPU a request
# (benchmarks/serve_load.py) but reports a dead replica as a gRPC error rather than the RayActorError that
# `_with_retry` retries and turns into a 503.
THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # user code on the replica's own event loop
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # handle calls routed on the caller's loop, not a second one
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # request-path logs flushed in blocks (at once on ERROR)
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",  # the loaded model's objects leave the garbage collector's scans
}
# HAProxy (the binary ray[serve] ships) on `serve.host:serve.port` in place of Serve's Python proxy, forwarding
# HTTP straight to the Ingress replicas (direct ingress, on ports 30000+ of `serve.host`). Measured on 2 cores
# (benchmarks/results/serve_load.md): the Python proxy and the extra hop cost ~6 ms of CPU per /v1/embed, a
# quarter of the request. Ray's default holds a stopping Ingress replica open 30 s so that load balancers can
# deregister it; HAProxy is told at once and retries refused connections, so 2 s is enough and `serve
# shutdown` and redeploys are not 30 s slower.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def serve_env(config: Config) -> dict[str, str]:
    """The Ray Serve environment of every Serve process of the app (empty: Ray's defaults)."""
    s = config.serve
    return {**(THROUGHPUT_ENV if s.throughput_optimized else {}), **(HAPROXY_ENV if s.haproxy else {})}


def logging_config(config: Config) -> dict[str, Any]:
    """Serve's `logging_config` of the controller, proxy and replicas: no per-request access lines unless
    `serve.access_log`, and `serve.log_level` (WARNING keeps warnings and errors)."""
    return {"enable_access_log": config.serve.access_log, "log_level": config.serve.log_level}


def resolve_devices(config: Config) -> Config:
    """`model.device` and `detect.device` as the Encoder replicas use them: `auto` decided here, against the GPUs of
    the cluster the app is deployed on (cuda when it has one, else cpu)."""
    return replace(config, model=replace(config.model, device=resolve_device(config.model.device)),
                   detect=replace(config.detect, device=resolve_device(config.detect.device)))


def encoder_gpus(config: Config) -> float:
    """GPU share an Encoder replica reserves: `serve.encoder_num_gpus` when its encoder or detector runs on cuda (Ray
    hides unreserved GPUs from an actor; the two models share the replica's), else none."""
    on_gpu = device_gpus(config.model.device) or device_gpus(config.detect.device)
    return config.serve.encoder_num_gpus if on_gpu else 0.0


def deployment_options(config: Config) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment from the `serve` and `store` sections.

    The Encoder autoscales between `serve.min_replicas` and `serve.max_replicas`; the Index is exactly one replica
    on a Milvus Lite file (one process may open it) and autoscales the same way against a Milvus server.
    """
    s = config.serve
    env = serve_env(config)

    def actor(num_cpus: float, num_gpus: float = 0.0) -> dict[str, Any]:
        return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {}),
                **({"runtime_env": {"env_vars": env}} if env else {})}

    common = {"logging_config": logging_config(config)}
    # max_replicas caps min_replicas: `--set serve.max_replicas=1` alone gives one replica.
    autoscaling = {"min_replicas": min(s.min_replicas, s.max_replicas), "max_replicas": s.max_replicas,
                   "target_ongoing_requests": s.target_ongoing_requests}
    index: dict[str, Any] = {"ray_actor_options": actor(s.index_num_cpus),
                             "max_ongoing_requests": 2 * index_batch_size(config), **common}
    if is_server_uri(config.store.uri):
        index["autoscaling_config"] = {**autoscaling, "min_replicas": max(1, autoscaling["min_replicas"])}
    else:
        index["num_replicas"] = 1
    return {
        "Index": index,
        # max_ongoing_requests: the replica's own queue feeds its batches; at least one batch running and one filling.
        "Encoder": {"ray_actor_options": actor(s.encoder_num_cpus, encoder_gpus(config)),
                    "max_ongoing_requests": max(s.encoder_max_ongoing_requests, 2 * s.max_batch_size),
                    "autoscaling_config": autoscaling, **common},
        # The ingress only awaits the others: many requests in flight cost it little.
        "Ingress": {"ray_actor_options": actor(s.ingress_num_cpus), "max_ongoing_requests": 256, **common},
    }


def make_app(config: Config, *, model_dir: str | Path | None = None, batch_search: bool = True) -> Any:
    """Binds the three deployments for `config`.

    Args:
        config: the resolved config; relative paths are resolved against this process's cwd.
        model_dir: the model to serve; default `serve.model_dir`, else the live collection's model.
        batch_search: merge concurrent searches into one Milvus call (False: one call per request).

    Returns:
        A Serve `Application` for `serve.run`.
    """
    config = resolve_devices(absolute_paths(config))
    options = deployment_options(config)
    chosen = str(Path(model_dir).expanduser().absolute()) if model_dir else ""
    index = Index.options(**options["Index"]).bind(config, batch_search, index_batch_size(config))
    encoder = Encoder.options(**options["Encoder"]).bind(config, chosen, index)
    return Ingress.options(**options["Ingress"]).bind(config, encoder, index)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` (`import_path: ootd.serve.app:build_app`).

    Args:
        args: `config` (built-in name or YAML path, default `default`), `overrides` (list of `section.key=value`
            or one comma-separated string), `model_dir` (optional), `batch_search` (default true).
    """
    config, model_dir, batch_search = builder_args(args)
    return make_app(config, model_dir=model_dir, batch_search=batch_search)


def builder_args(args: dict[str, Any]) -> tuple[Config, str | None, bool]:
    """`build_app`'s args (as YAML or `serve run key=value` gives them) → (config, model dir or None, batch_search)."""
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [o for o in overrides.split(",") if o.strip()]
    config = load_config(args.get("config") or "default", overrides)
    batch = args.get("batch_search", True)
    if isinstance(batch, str):
        batch = batch.strip().lower() not in ("0", "false", "no", "off")
    return config, args.get("model_dir") or None, bool(batch)


def start_serve(config: Config) -> None:
    """Starts Serve on the connected cluster with the app's HTTP, logging and environment settings.

    The controller's options apply when this call creates it (a fresh cluster, as `ootd serve` starts); on a
    cluster whose Serve runs already they are Ray's warning, and its controller keeps what it started with.
    """
    env = serve_env(config)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port},
                logging_config=logging_config(config),
                controller_options={"runtime_env": {"env_vars": env}} if env else None)


def run_app(
    config: Config,
    *,
    config_source: str = "default",
    overrides: Sequence[str] = (),
    model_dir: str | Path | None = None,
    batch_search: bool = True,
) -> str:
    """Starts Serve on `serve.host:serve.port` of the connected cluster and deploys the app; returns its URL.

    Args:
        config: the resolved config.
        config_source: the config name or path it came from (logged, so the deployment can be reproduced).
        overrides: the overrides applied to it (logged).
        model_dir: the model to serve (see `make_app`).
        batch_search: see `make_app`.

    Raises:
        ValueError: a non-loopback host without an API key (see `check_write_protection`).
    """
    from ootd.config import redact_overrides

    check_write_protection(config)
    log.info("deploying ootd (config %s, overrides %s)", config_source, redact_overrides(overrides))
    start_serve(config)
    serve.run(make_app(config, model_dir=model_dir, batch_search=batch_search), name=APP_NAME, route_prefix="/")
    return f"http://{config.serve.host}:{config.serve.port}"
