"""`ootd demo`: the main job end to end on one machine — ingest, train, evaluate, index, serve — resumable."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ootd.config import Config, config_to_dict, load_config, save_config

log = logging.getLogger("ootd.demo")

BANNER = "=" * 78
SAMPLE_PER_STYLE = 60  # 780 synthetic photos: a test split of ~120 images, and the batch part in ~4 minutes


def _say(message: str) -> None:
    print(message, flush=True)


def _loud(message: str) -> None:
    _say(f"\n{BANNER}\n{message}\n{BANNER}\n")


def resolve_demo_config(config: Config, overrides: Sequence[str] = ()) -> Config:
    """Keeps the configured backbone when its weights are local; otherwise falls back to tiny (with the same
    overrides), loudly."""
    from ootd.doctor import check_backbone

    check = check_backbone(config, required=False)
    if check.ok:
        return config
    _loud(
        f"WARNING: {config.model.backbone} is not available on this machine ({check.detail}).\n"
        "Falling back to the TINY offline model: the pipeline is real, but its embeddings are NOT\n"
        f"fashion-aware. To use the real model: {check.fix}"
    )
    return load_config("tiny", list(overrides))


def weights_digests(config: Config) -> dict[str, str]:
    """sha256 of the weight files the stages read beyond the config: a committed asset replaced under the same
    name (a new detector, a re-pretrained trunk) must not let a rerun reuse crops or models made with the old one."""
    from ootd.detect.yolo import weights_sha256
    from ootd.model.backbones import TINY_WEIGHTS

    digests = {"detector": weights_sha256(config.detect.weights) or "missing"}  # the ingest stage reports a missing one
    if config.model.backbone == "tiny":
        trunk = TINY_WEIGHTS.read_bytes() if TINY_WEIGHTS.is_file() else None
        digests["backbone"] = hashlib.sha256(trunk).hexdigest() if trunk is not None else "missing"
    return digests


class StageLog:
    """Records finished stages in <workdir>/demo_state.json so a second run reuses them.

    Args:
        workdir: the demo's folder.
        config: the run's config; with `inputs` and the weight files' digests it keys the record.
        inputs: the photo source.
        derived: folders under `workdir` that a stage resumes from: when the key changed they are removed, so
            nothing made with the old settings survives into the new run.
    """

    def __init__(self, workdir: Path, config: Config, inputs: str, derived: Sequence[str] = ()):
        self.path = workdir / "demo_state.json"
        fingerprint = json.dumps({"config": config_to_dict(config), "inputs": inputs,
                                  "weights": weights_digests(config)}, sort_keys=True)
        self.key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.done: dict[str, Any] = state.get("done", {}) if state.get("key") == self.key else {}
        if state and state.get("key") != self.key:
            _say("settings, inputs or weights changed since the last demo run here: its stages start afresh")
            for name in derived:
                shutil.rmtree(workdir / name, ignore_errors=True)

    def run(self, name: str, title: str, fn: Callable[[], Any]) -> Any:
        if name in self.done:
            _say(f"\n--- {title}: reusing the previous run's result")
            return self.done[name]
        _say(f"\n--- {title}")
        start = time.monotonic()
        result = fn()
        _say(f"--- {title}: done in {time.monotonic() - start:.0f}s")
        self.done[name] = result
        self.path.write_text(json.dumps({"key": self.key, "done": self.done}, indent=2, default=str))
        return result


def run_demo(
    config: Config,
    *,
    overrides: Sequence[str] = (),
    images: Path | None,
    workdir: Path,
    keep_serving: bool,
    port: int,
) -> int:
    """Runs every stage on the embedded default and prints how to use the result.

    Args:
        config: the resolved config; the backbone falls back to `tiny` when its weights are not local.
        overrides: the `--set` overrides `config` was built with (re-applied to `tiny` on a fallback).
        images: a folder per style of the user's own photos; None generates synthetic outfits.
        workdir: where data, tables, checkpoints, models, Milvus and reports go.
        keep_serving: keep the HTTP app up until Ctrl-C.
        port: HTTP port of the app.

    Returns:
        The process exit code.
    """
    from ootd.config import with_overrides

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = resolve_demo_config(config, overrides)
    config = with_overrides(
        config,
        [
            f"data.workdir={workdir}",
            f"store.uri={workdir / 'milvus.db'}",
            f"store.media={workdir / 'media'}",
            f"train.storage_path={workdir / 'ray_results'}",
            f"serve.port={port}",
        ],
    )
    save_config(config, workdir / "config.yaml")
    source = str(images.resolve()) if images else str(workdir / "sample" / "images")
    # crops/ (ingest skips photos already there) and ray_results/ (training resumes its run by name)
    stages = StageLog(workdir, config, source, derived=("crops", "errors", "ray_results"))

    if images is None:
        from ootd.synthetic import write_sample_data

        stages.run(
            "sample",
            f"1/6 synthetic outfits (13 styles x {SAMPLE_PER_STYLE} photos)",
            lambda: write_sample_data(workdir / "sample", per_style=SAMPLE_PER_STYLE, seed=0, size=256,
                                      overwrite=True),
        )

    from ootd.evaluate.run import evaluate
    from ootd.index import run_index
    from ootd.ingest.pipeline import run_ingest
    from ootd.train.driver import run_training

    ingest = stages.run("ingest", "2/6 ingest: decode, dedup, YOLO crop (Ray Data)",
                        lambda: run_ingest(config, source, workdir))
    crops = workdir / "crops"
    trained = stages.run("train", "3/6 fine-tune head + top blocks (Ray Train, 2 DDP workers)",
                         lambda: run_training(config, crops, workdir=workdir))  # fmt: skip
    model_dir = Path(trained["model_dir"])
    report = stages.run(
        "evaluate", "4/6 evaluate: frozen vs fine-tuned, crop vs whole image",
        lambda: evaluate(model_dir, crops, workdir / "eval", split="test", config=config,
                         val_fraction=config.train.val_fraction, test_fraction=config.train.test_fraction),
    )  # fmt: skip
    stages.run("index", "5/6 index: embed crops into Milvus, move the live alias",
               lambda: run_index(config, crops, model_dir))

    _say("\n--- 6/6 serve: deploying the Ray Serve app")
    from ootd.serve.app import run_app
    from ootd.serve.client import search_by_photo, serve_until_interrupted

    url = run_app(config, config_source=str(workdir / "config.yaml"), overrides=[], model_dir=model_dir)
    example = _example_image(workdir)
    hits = search_by_photo(url, example, top_k=6)  # the photo itself (it was indexed) and the five nearest others
    _say(f"\nIngest: {json.dumps(_short(ingest))}")
    _say(f"\nEvaluation (held-out split):\n{report.get('report', '') if isinstance(report, dict) else report}")
    _say(f"\nSearch with {example} →")
    for rank, hit in enumerate(hits, start=1):
        _say(f"  {rank}. score {hit['score']:.3f}  {hit['style']:<9} {hit['source']}")
    others = [hit for hit in hits if hit["source"] != str(example)][:5]
    same = sum(hit["style"] == example.parent.name for hit in others)
    _say(f"  {same} of the {len(others)} nearest other outfits share the query's style ({example.parent.name})")
    _say(
        f"\nGallery:  {url}/\nAPI docs: {url}/docs\n"
        f"Try:      curl -s -F image=@{example} -F top_k=5 {url}/v1/search | python -m json.tool\n"
    )
    if keep_serving:
        _say("Serving until Ctrl-C ...")
        serve_until_interrupted()
    else:
        from ray import serve

        serve.shutdown()
    return 0


def _short(summary: Any) -> Any:
    if not isinstance(summary, dict):
        return summary
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def _example_image(workdir: Path) -> Path:
    """A photo to search with: the first synthetic or user photo that was ingested."""
    import pyarrow.parquet as pq

    table = pq.read_table(workdir / "crops", columns=["source"])
    return Path(sorted(table.column("source").to_pylist())[0])
