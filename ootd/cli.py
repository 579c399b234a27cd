"""The `ootd` command: one thin sub-command per job, each calling the library with a resolved config."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ootd: outfit photos in, 128-d style embeddings out, style-similar outfits served over HTTP.",
)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Built-in config (default, tiny) or a YAML path.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: --set train.lr_head=1e-4 (repeatable)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address; default: RAY_ADDRESS, else a local Ray instance."),
]


def _config(name: str, overrides: list[str] | None):
    from ootd.config import ConfigError, load_config

    try:
        return load_config(name, overrides or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config/--set") from exc


def _connect_ray(address: str | None) -> None:
    """Joins the given cluster, the one RAY_ADDRESS names, or starts a local instance."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def _print_json(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Libraries that narrate their own start-up at INFO; their warnings still show.
    for noisy in ("faiss", "faiss.loader", "milvus_lite", "grpc._server"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.DEBUG)


@app.command()
def doctor(config: ConfigOpt = "default") -> None:
    """Check versions, Ray, Milvus Lite and local model weights; print the fix for each missing piece."""
    from ootd.doctor import run_checks

    checks = run_checks(config)
    width = max(len(c.name) for c in checks)
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "miss")
        typer.echo(f"[{mark}] {check.name:<{width}}  {check.detail}")
        if not check.ok and check.fix:
            typer.echo(f"       {'':<{width}}  fix: {check.fix}")
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        typer.echo(f"\n{len(failed)} required check(s) failed: ootd cannot run its tiny offline config.", err=True)
        raise typer.Exit(1)
    typer.echo("\nEverything the tiny offline config needs is here.")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/sample"),
    per_style: Annotated[int, typer.Option(min=1, help="Photos per style.")] = 20,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical output.")] = 0,
    size: Annotated[int, typer.Option(min=96, help="Image side in pixels.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier sample set in --out.")] = False,
) -> None:
    """Write synthetic outfit photos: folder per style, a YOLO dataset and a manifest."""
    from ootd.synthetic import write_sample_data

    try:
        summary = write_sample_data(out, per_style=per_style, seed=seed, size=size, overwrite=overwrite)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from exc
    _print_json(summary)


@app.command()
def ingest(
    source: Annotated[str, typer.Option(help="Folder with one sub-folder per style, or a manifest csv/parquet.")],
    out: Annotated[Path | None, typer.Option(help="Output folder; default: data.workdir.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N inputs.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Data: decode, dedup, detect garments, crop outfits; writes the crops and errors tables."""
    from ootd.ingest import run_ingest

    cfg = _config(config, overrides)
    _connect_ray(address)
    _print_json(run_ingest(cfg, source, out or Path(cfg.data.workdir), limit=limit))


@app.command("train-detector")
def train_detector(
    data: Annotated[Path, typer.Option(help="YOLO data.yaml (e.g. K-Fashion converted, or sample-data's yolo/).")],
    out: Annotated[Path, typer.Option(help="Output folder for weights and metrics.")] = Path("runs/detector"),
    model: Annotated[str, typer.Option(help="Ultralytics architecture yaml or weights to start from.")] = (
        "yolo11n.yaml"
    ),
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    imgsz: Annotated[int, typer.Option(min=32)] = 256,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="cpu, 0, 0,1 ...")] = "cpu",
    seed: int = 0,
) -> None:
    """Train a YOLO garment detector; reports mAP50 and median outfit-box IoU on the val split."""
    from ootd.detector_training import train_detector as run

    metrics = run(data.resolve(), out, model=model, epochs=epochs, imgsz=imgsz, batch=batch, device=device, seed=seed)
    _print_json(metrics)


@app.command()
def train(
    crops: Annotated[Path, typer.Option(help="Crops table folder written by `ootd ingest`.")],
    workdir: Annotated[Path | None, typer.Option(help="Default: data.workdir.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Train DDP fine-tuning of the head and top blocks; exports a model dir."""
    from ootd.train import run_training

    cfg = _config(config, overrides)
    _connect_ray(address)
    _print_json(run_training(cfg, crops, workdir=workdir or Path(cfg.data.workdir)))


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Option(help="Exported model dir.")],
    crops: Annotated[Path, typer.Option(help="Crops table folder.")],
    out: Annotated[Path | None, typer.Option(help="Default: <model_dir>/eval.")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
) -> None:
    """Retrieval metrics, style matrix and plots: frozen vs fine-tuned, crop vs whole image."""
    from ootd.evaluate import evaluate as run

    cfg = _config(config, overrides)
    result = run(
        model_dir, crops, out or model_dir / "eval", split=split,
        val_fraction=cfg.train.val_fraction, test_fraction=cfg.train.test_fraction, config=cfg,
    )  # fmt: skip
    typer.echo(result.get("report", json.dumps(result, indent=2, default=str)))


@app.command()
def index(
    crops: Annotated[Path, typer.Option(help="Crops table folder.")],
    model_dir: Annotated[Path, typer.Option(help="Exported model dir to embed with.")],
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Data embed → Milvus upsert into the model version's collection, then move the live alias."""
    from ootd.index import run_index

    cfg = _config(config, overrides)
    _connect_ray(address)
    _print_json(run_index(cfg, crops, model_dir))


@app.command()
def serve(
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    model_dir: Annotated[Path | None, typer.Option(help="Default: the live collection's model.")] = None,
    address: AddressOpt = None,
) -> None:
    """Deploy the Serve app (ingress, autoscaled encoder, Milvus index) and keep it up until Ctrl-C."""
    from ootd.serve.app import run_app

    cfg = _config(config, overrides)
    _connect_ray(address)
    url = run_app(cfg, config_source=config, overrides=overrides or [], model_dir=model_dir)
    typer.echo(f"serving on {url} (docs: {url}/docs); Ctrl-C stops")
    _wait_forever()


def _wait_forever() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="Photo to search with.")],
    url: Annotated[str, typer.Option(help="Base URL of a running ootd server.")] = "http://127.0.0.1:8000",
    top_k: Annotated[int, typer.Option(min=1, max=100)] = 10,
    style: Annotated[list[str] | None, typer.Option(help="Only these styles (repeatable).")] = None,
) -> None:
    """Search a running server with a photo and print the style-similar outfits."""
    import requests

    params = {"top_k": str(top_k)}
    if style:
        params["styles"] = ",".join(style)
    with image.open("rb") as handle:
        resp = requests.post(f"{url}/v1/search", files={"image": (image.name, handle)}, data=params, timeout=60)
    if resp.status_code != 200:
        typer.echo(f"error {resp.status_code}: {resp.text}", err=True)
        raise typer.Exit(1)
    for rank, hit in enumerate(resp.json()["results"], start=1):
        typer.echo(f"{rank:>3}. {hit['score']:.3f}  {hit['style']:<10} {hit['source']}")


@app.command()
def demo(
    images: Annotated[Path | None, typer.Option(help="Your own folder-per-style photos.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    workdir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path("runs/demo"),
    keep_serving: Annotated[bool, typer.Option(help="Keep the app up until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(help="HTTP port of the app.")] = 8000,
) -> None:
    """Ingest → train → evaluate → index → serve on the embedded default, with synthetic outfits unless --images."""
    from ootd.demo import run_demo

    cfg = _config(config, overrides)
    code = run_demo(cfg, images=images, workdir=workdir, keep_serving=keep_serving, port=port)
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `jobs/*.py` shims: runs one sub-command and returns its exit code."""
    import click

    try:
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except click.ClickException as exc:  # usage and config errors: print them as the shell command would
        exc.show()
        return exc.exit_code
    except (typer.Exit, click.exceptions.Exit) as exc:
        return exc.exit_code
    return 0
