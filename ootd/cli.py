"""The `ootd` command: one thin sub-command per job, each calling the library with a resolved config."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

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


class Split(str, enum.Enum):
    train = "train"
    val = "val"
    test = "test"


def _fail(message: str) -> NoReturn:
    """A bad input or missing file: one line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turns the library's input errors (missing files, bad values, unavailable models) into `_fail`."""
    from ootd.model.backbones import ModelNotAvailable

    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, ModelNotAvailable) as exc:
        _fail(str(exc))


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE strings → dict, each value read as YAML (numbers, booleans, lists stay typed)."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            _fail(f"{option} takes KEY=VALUE, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def _warn_if_relative(**paths: str | Path | None) -> None:
    """Under `ray job submit` the entrypoint runs in Ray's copy of the working dir, so relative paths land there."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return
    for name, value in paths.items():
        if value and "://" not in str(value) and not Path(value).expanduser().is_absolute():
            logging.getLogger("ootd").warning("%s=%s is relative to the job's copy of the repo (%s): pass absolute "
                                              "paths or shared storage", name, value, Path.cwd())


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
    from ootd.logs import setup_logging

    setup_logging(verbose)


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
    source: Annotated[str | None, typer.Option(
        help="Folder with one sub-folder per style, or a csv/parquet/jsonl manifest (path or url[, style]); "
             "default: data.source."
    )] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder for crops/, errors/ and the summary; default: "
                                                  "data.workdir.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N inputs (in path order).")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Data: decode, dedup, detect garments, crop outfits; writes the crops and errors tables."""
    from ootd.ingest.pipeline import run_ingest

    cfg = _config(config, overrides)
    source = source or cfg.data.source
    if not source:
        _fail("no input: pass --source or set data.source")
    out = out or Path(cfg.data.workdir)
    _warn_if_relative(source=source, out=out)
    _connect_ray(address)
    with _user_errors():
        _print_json(run_ingest(cfg, source, out, limit=limit))


@app.command("train-detector")
def train_detector(
    data: Annotated[Path, typer.Option(help="YOLO data.yaml (e.g. K-Fashion converted, or sample-data's yolo/).")],
    out: Annotated[Path, typer.Option(help="Output folder for weights and metrics.")] = Path("runs/detector"),
    model: Annotated[str, typer.Option(
        help="Architecture YAML (random init; bare names are also looked up in ootd/assets) or a local .pt to "
        "fine-tune. Nothing is downloaded."
    )] = "yolo11n.yaml",
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    imgsz: Annotated[int | None, typer.Option(min=32, help="Default: detect.imgsz.")] = None,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str | None, typer.Option(help="cpu, 0, cuda:0; default: detect.device.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Dataloader workers (0: load in the training process).")] = 0,
    seed: int = 0,
    cache: Annotated[bool, typer.Option(help="Cache decoded images in RAM (faster, not bit-reproducible).")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads; default: as the process has.")] = None,
    augment: Annotated[str, typer.Option(help="Ultralytics augmentation preset: ultralytics (its defaults) or "
                                             "domain (stronger colour/geometry/scale jitter).")] = "ultralytics",
    randomise_per_style: Annotated[int, typer.Option(min=0, help="Domain-randomised photos per style rendered "
                                                     "into OUT/randomised and added to the train split.")] = 0,
    randomisation: Annotated[str, typer.Option(help="Randomisation preset of those photos (training; held-out "
                                                    "is for measuring only).")] = "training",
    randomise_seed: Annotated[int, typer.Option(help="Seed of the randomised photos.")] = 1000,
    ultralytics_args: Annotated[list[str] | None, typer.Option(
        "--ultralytics-arg", help="An ultralytics train argument as KEY=VALUE (repeatable; e.g. degrees=12); it wins "
        "over --augment's preset.")] = None,
    ray_task: Annotated[bool, typer.Option("--ray/--no-ray", help="Train in a Ray task (any node) or here.")] = True,
    num_cpus: Annotated[float, typer.Option(min=0, help="CPUs the Ray task reserves.")] = 1.0,
    num_gpus: Annotated[float | None, typer.Option(min=0, help="GPUs the Ray task reserves; default: 1 unless "
                                                              "the device is cpu.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Train a YOLO garment detector; reports mAP50 and median outfit-box IoU on the val split."""
    from ootd.config import save_config
    from ootd.detect import training as detector_training

    cfg = _config(config, overrides)
    data = data.expanduser().resolve()
    if not data.is_file():
        _fail(f"dataset YAML not found: {data}")
    out = out.expanduser().resolve()
    device = device or cfg.detect.device
    kwargs = {"model": model, "epochs": epochs, "imgsz": imgsz or cfg.detect.imgsz, "batch": batch, "device": device,
              "workers": workers, "seed": seed, "cache": cache, "conf": cfg.detect.conf,
              "relative_conf": cfg.detect.relative_conf, "threads": threads,
              "augment": augment, "randomise_per_style": randomise_per_style, "randomisation": randomisation,
              "randomise_seed": randomise_seed, "extra": _key_values(ultralytics_args or [], "--ultralytics-arg")}
    with _user_errors():
        if ray_task:
            _connect_ray(address)
            gpus = num_gpus if num_gpus is not None else (0.0 if device == "cpu" else 1.0)
            metrics = detector_training.train_detector_on_ray(data, out, num_cpus=num_cpus, num_gpus=gpus, **kwargs)
        else:
            metrics = detector_training.train_detector(data, out, **kwargs)
    save_config(cfg, out / "config.yaml")
    _print_json(metrics)


@app.command("pretrain-backbone")
def pretrain_backbone(
    out: Annotated[Path, typer.Option(help="Output folder for the trunk weights and metrics.")] = Path("runs/pretrain"),
    n_train: Annotated[int, typer.Option(min=1, help="Training photos (attribute mode).")] = 16384,
    n_eval: Annotated[int, typer.Option(min=2, help="Held-out photos (their own seed stream).")] = 1024,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch, split across workers.")] = 128,
    render_size: Annotated[int, typer.Option(min=64, help="Side of each rendered photo, before the outfit "
                                                          "crop (the demo's photos are 256 px).")] = 256,
    image_size: Annotated[int, typer.Option(min=16, help="Trunk input side in px (a multiple of 16).")] = 128,
    final_image_size: Annotated[int | None, typer.Option(min=16, help="Input side of the last --final-epochs "
                                                         "epochs (a progressive resize in one run).")] = None,
    final_epochs: Annotated[int, typer.Option(min=0, help="Epochs (of --epochs) at --final-image-size.")] = 0,
    init: Annotated[Path | None, typer.Option(help="Trunk weights to continue from (a first stage's "
                                                   "tiny-backbone.safetensors); default: random init.")] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak AdamW learning rate.")] = 1.5e-3,
    seed: int = 0,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train (DDP) workers.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(min=0.1, help="CPUs (torch threads) per worker.")] = 1.0,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast; default: only where "
                                              "the CPU has AVX512-BF16 or AMX (elsewhere it is ~12x slower).")] = None,
    install: Annotated[bool, typer.Option(help="Also copy the weights and metrics into ootd/assets/ (the "
                                               "committed `tiny` backbone).")] = False,
    address: AddressOpt = None,
) -> None:
    """Ray Train DDP pretraining of the tiny ViT on synthetic garment attributes (never styles)."""
    import shutil

    from ootd.model.backbones import TINY_WEIGHTS
    from ootd.train.pretrain import METRICS_FILE, WEIGHTS_FILE, PretrainSettings
    from ootd.train.pretrain import pretrain_backbone as run

    settings = PretrainSettings(
        n_train=n_train, n_eval=n_eval, epochs=epochs, batch_size=batch_size, lr=lr, render_size=render_size,
        image_size=image_size, final_image_size=final_image_size, final_epochs=final_epochs,
        init=str(init.expanduser().resolve()) if init else None, seed=seed,
        num_workers=num_workers, cpus_per_worker=cpus_per_worker, bf16=bf16,
    )  # fmt: skip
    _warn_if_relative(out=out)
    _connect_ray(address)
    with _user_errors():
        summary = run(settings, out.expanduser())
    if install:
        shutil.copyfile(out.expanduser() / WEIGHTS_FILE, TINY_WEIGHTS)
        shutil.copyfile(out.expanduser() / METRICS_FILE, TINY_WEIGHTS.parent / METRICS_FILE)
        summary["installed"] = str(TINY_WEIGHTS)
    _print_json(summary)


@app.command()
def train(
    crops: Annotated[Path, typer.Option(help="Crops table folder written by ingest (<workdir>/crops).")],
    workdir: Annotated[Path | None, typer.Option(help="Feature cache, Ray Train runs, models; default: "
                                                      "data.workdir.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Train DDP fine-tuning of the head and top blocks; exports the best model dir."""
    from ootd.train.driver import run_training

    cfg = _config(config, overrides)
    workdir = workdir or Path(cfg.data.workdir)
    _warn_if_relative(crops=crops, workdir=workdir)
    if not crops.expanduser().is_dir():
        _fail(f"crops table folder not found: {crops.expanduser().resolve()}")
    _connect_ray(address)
    with _user_errors():
        summary = run_training(cfg, crops.expanduser(), workdir=workdir.expanduser())
    _print_json(summary)
    typer.echo(f"model dir: {summary['model_dir']}")


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Option(help="Exported model dir (<workdir>/models/<version>).")],
    crops: Annotated[Path, typer.Option(help="Crops table folder written by ingest.")],
    out: Annotated[Path | None, typer.Option(help="Report folder; default: <model-dir>/eval.")] = None,
    split: Annotated[Split, typer.Option(help="Which split to score.")] = Split.test,
    baseline_backbone: Annotated[str | None, typer.Option(
        help="Frozen baseline backbone; default: the one the model was fine-tuned from.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
) -> None:
    """Retrieval metrics, style matrix and plots: frozen vs fine-tuned, crop vs whole image."""
    from ootd.evaluate.run import evaluate as run

    cfg = _config(config, overrides)
    _warn_if_relative(model_dir=model_dir, crops=crops, out=out)
    with _user_errors():
        result = run(
            model_dir, crops, out or model_dir / "eval", split=split.value,
            val_fraction=cfg.train.val_fraction, test_fraction=cfg.train.test_fraction,
            baseline_backbone=baseline_backbone, config=cfg, batch_size=batch_size,
            precision=cfg.model.precision, device=device, progress=progress,
        )  # fmt: skip
    typer.echo(result["table"])
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}")
    if result["skipped"]["count"]:
        typer.echo(f"warning: {result['skipped']['count']} image(s) left out (unreadable crop or photo), "
                   "see metrics.json")
    typer.echo(f"\nreport: {result['files']['report']}\nmetrics: {result['files']['metrics']}")


@app.command()
def index(
    crops: Annotated[Path, typer.Option(help="Crops table folder written by ingest.")],
    model_dir: Annotated[Path, typer.Option(help="Exported model dir to embed with.")],
    out: Annotated[Path | None, typer.Option(help="Summary folder; default: <workdir>/index/<version>.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Index only the first N crops.")] = None,
    swap: Annotated[bool, typer.Option(help="Move the live alias when done (--no-swap: fill only).")] = True,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Embedding actors; default: "
                                                               "detect.concurrency.")] = None,
    num_cpus: Annotated[float | None, typer.Option(min=0, help="CPUs per actor; default: detect.num_cpus.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per encoder forward pass.")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (one GPU per actor) or auto; default: "
                                                    "model.device.")] = None,
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Ray Data embed → Milvus upsert into the model version's collection, then move the live alias."""
    from ootd.index import run_index

    cfg = _config(config, overrides)
    _warn_if_relative(crops=crops, model_dir=model_dir, store_uri=cfg.store.uri)
    _connect_ray(address)
    with _user_errors():
        summary = run_index(cfg, crops, model_dir, out=out, limit=limit, swap=swap, concurrency=concurrency,
                            num_cpus=num_cpus, batch_size=batch_size, device=device)
    _print_json(summary)


@app.command()
def serve(
    config: ConfigOpt = "default",
    overrides: SetOpt = None,
    model_dir: Annotated[Path | None, typer.Option(help="Default: the live collection's model.")] = None,
    address: AddressOpt = None,
) -> None:
    """Deploy the Serve app (ingress, autoscaled encoder, Milvus index); SIGTERM or Ctrl-C drains it and exits 0.

    Secrets come from the environment (OOTD_API_KEY, OOTD_MILVUS_TOKEN) rather than --set, which `ps` shows.
    """
    from ootd.serve.app import check_write_protection, run_app
    from ootd.serve.client import serve_until_interrupted

    cfg = _config(config, overrides)
    with _user_errors():
        check_write_protection(cfg)  # before joining a cluster: a refusal costs nothing
    _connect_ray(address)

    def deploy() -> None:
        url = run_app(cfg, config_source=config, overrides=overrides or [], model_dir=model_dir)
        typer.echo(f"serving on {url} (docs: {url}/docs); SIGTERM or Ctrl-C stops")

    with _user_errors():
        serve_until_interrupted(deploy)  # a signal while deploying drains too
    typer.echo("stopped")


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="Photo to search with.")],
    url: Annotated[str, typer.Option(help="Base URL of a running ootd server.")] = "http://127.0.0.1:8000",
    top_k: Annotated[int, typer.Option(min=1, max=100)] = 10,
    style: Annotated[list[str] | None, typer.Option(help="Only these styles (repeatable).")] = None,
) -> None:
    """Search a running server with a photo and print the style-similar outfits."""
    from ootd.serve.client import search_by_photo

    try:
        hits = search_by_photo(url, image, top_k, style or ())
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    for rank, hit in enumerate(hits, start=1):
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
    import ray

    from ootd.demo import run_demo

    cfg = _config(config, overrides)
    # The demo runs on a local Ray instance of its own (two CPUs: the machine the README promises it fits).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    try:
        code = run_demo(cfg, overrides=overrides or [], images=images, workdir=workdir, keep_serving=keep_serving,
                        port=port)
    finally:
        ray.shutdown()
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Runs one sub-command (argv without the program name) and returns its exit code instead of exiting."""
    import click

    try:
        code = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except click.ClickException as exc:  # usage and config errors: print them as the shell command would
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return 130
    return code if isinstance(code, int) else 0


def job(command: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of a `jobs/<name>.py` entry point: the `ootd <command>` sub-command with the job's argv."""
    return lambda argv=None: main([command, *(sys.argv[1:] if argv is None else argv)])
