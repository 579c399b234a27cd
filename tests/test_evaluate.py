"""Evaluation on a crops table built from synthetic outfits with a tiny model: files, values, errors, the job."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ootd.evaluate.metrics import retrieval_metrics

SPLIT = {"split": "test", "val_fraction": 0.0, "test_fraction": 0.5}
RETRIEVAL_KEYS = [f"{m}@{k}" for m in ("P", "R", "mAP", "nDCG") for k in (1, 5, 10)] + ["MRR"]
MISSING_ID = "0" * 63 + "1"  # leading zeros: lands in the test split for any test_fraction > 0
UNLABELLED_ID = "0" * 62 + "22"


def write_crops_table(sample_dir: Path, out: Path) -> Path:
    """A crops table as ingest would write it, from the synthetic manifest's ground-truth outfit boxes.

    Two extra rows in the test split: one whose source photo is gone, one without a style.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    manifest = pd.read_parquet(sample_dir / "manifest.parquet")
    rows = []
    for item in manifest.itertuples():
        path = sample_dir / item.path
        data = path.read_bytes()
        box = [int(round(v)) for v in item.outfit_box]
        with Image.open(io.BytesIO(data)) as image:
            buf = io.BytesIO()
            image.convert("RGB").crop(tuple(box)).save(buf, format="JPEG", quality=92)
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "source": str(path.resolve()),
                "style": item.style,
                "width": int(item.width),
                "height": int(item.height),
                "box": box,
                "det_score": 1.0,
                "n_garments": len(item.garment_classes),
                "fallback": False,
                "crop": buf.getvalue(),
            }
        )
    rows.append({**rows[0], "image_id": MISSING_ID, "source": str(out / "gone.jpg")})
    rows.append({**rows[1], "image_id": UNLABELLED_ID, "style": None})
    crops = out / "crops"
    crops.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), crops / "part-0.parquet")
    return crops


def export_tuned_model(tiny_config, out: Path) -> Path:
    """A tiny model whose top block and head moved away from the shared initial weights, as fine-tuning does."""
    import torch

    from ootd.model.encoder import build_encoder
    from ootd.styles import STYLES

    encoder = build_encoder(tiny_config.model)
    top = encoder.visual.trunk.blocks[-1]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in [*top.parameters(), *encoder.head.parameters()]:
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return encoder.export(out / "model", labels=STYLES, config=tiny_config, unlocked_blocks=1)


@pytest.fixture(scope="module")
def evaluated(synthetic_set, tiny_config, tmp_path_factory):
    from ootd.evaluate.run import evaluate

    root = tmp_path_factory.mktemp("evaluate")
    crops = write_crops_table(synthetic_set, root)
    model_dir = export_tuned_model(tiny_config, root)
    result = evaluate(model_dir, crops, root / "eval", **SPLIT, config=tiny_config, batch_size=16, progress=False)
    return {"root": root, "crops": crops, "model_dir": model_dir, "out": root / "eval", "result": result}


def _test_rows(crops: Path) -> list[dict]:
    import pyarrow.parquet as pq

    from ootd.splits import split_of

    rows = pq.read_table(crops).to_pylist()
    return [
        r for r in rows if r["style"] and r["image_id"] != MISSING_ID and split_of(r["image_id"], 0.0, 0.5) == "test"
    ]


def test_metrics_json_has_six_variants_with_valid_values(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    expected_rows = _test_rows(evaluated["crops"])
    assert metrics["n_images"] == len(expected_rows) == evaluated["result"]["n_images"]
    assert set(metrics["variants"]) == {
        "histogram_crop", "frozen_random_crop", "frozen_crop", "frozen_whole", "finetuned_crop", "finetuned_whole",
    }
    assert metrics["random_backbone"] == "tiny-random"
    n_styles = len(metrics["styles"])
    assert sum(metrics["counts"].values()) == metrics["n_images"]
    for name, scores in metrics["variants"].items():
        for key in RETRIEVAL_KEYS:
            assert 0.0 <= scores[key] <= 1.0, (name, key)
        assert -1.0 <= scores["silhouette"] <= 1.0
        matrix = np.array(scores["style_matrix"], dtype=float)
        assert matrix.shape == (n_styles, n_styles)
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)
    assert metrics["variants"]["frozen_crop"]["dim"] == 192  # tiny backbone width, no head
    assert metrics["variants"]["finetuned_crop"]["dim"] == 128
    assert metrics["variants"]["histogram_crop"]["dim"] == 512 == metrics["embedding_dims"]["histogram"]
    # Synthetic styles have their own palettes: colour alone must retrieve well above chance (1/13).
    assert metrics["variants"]["histogram_crop"]["P@1"] > 0.2


def test_unreadable_photo_is_left_out_of_every_variant_and_unlabelled_rows_ignored(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    assert metrics["skipped"]["count"] == 1
    (example,) = metrics["skipped"]["examples"]
    assert example["image_id"] == MISSING_ID
    assert example["stage"] == "read" and "gone.jpg" in example["error"]
    assert "1 image left out" in (evaluated["out"] / "report.md").read_text()


def test_variants_use_the_right_model_and_image(evaluated):
    from PIL import Image

    from ootd.evaluate.metrics import color_histogram
    from ootd.evaluate.run import frozen_baseline
    from ootd.model.export import load

    rows = _test_rows(evaluated["crops"])
    styles = [r["style"] for r in rows]
    crops = [Image.open(io.BytesIO(r["crop"])).convert("RGB") for r in rows]
    wholes = [Image.open(r["source"]).convert("RGB") for r in rows]
    tuned = load(evaluated["model_dir"])
    frozen = frozen_baseline(evaluated["model_dir"])
    untrained = frozen_baseline(evaluated["model_dir"], backbone="tiny-random")
    variants = json.loads((evaluated["out"] / "metrics.json").read_text())["variants"]
    expected = {
        "histogram_crop": np.stack([color_histogram(np.asarray(c), 8) for c in crops]),
        "finetuned_crop": tuned.embed(crops),
        "finetuned_whole": tuned.embed(wholes),
        "frozen_crop": frozen.embed_features(crops),
        "frozen_whole": frozen.embed_features(wholes),
        "frozen_random_crop": untrained.embed_features(crops),
    }
    for name, vectors in expected.items():
        want = retrieval_metrics(vectors, styles)
        for key in ("P@1", "P@10", "mAP@10", "MRR"):
            assert variants[name][key] == pytest.approx(want[key], abs=1e-6), (name, key)


def test_a_baseline_without_an_untrained_twin_leaves_the_random_variant_out(evaluated, tiny_config, tmp_path):
    from ootd.evaluate.run import evaluate

    result = evaluate(evaluated["model_dir"], evaluated["crops"], tmp_path, **SPLIT, config=tiny_config,
                      batch_size=16, progress=False, baseline_backbone="tiny-random")
    assert result["random_backbone"] is None
    assert set(result["variants"]) == {"histogram_crop", "frozen_crop", "frozen_whole", "finetuned_crop",
                                       "finetuned_whole"}
    assert "frozen random init" not in result["report"]


def test_frozen_baseline_is_the_untuned_starting_backbone(evaluated, tiny_config):
    import torch

    from ootd.evaluate.run import frozen_baseline
    from ootd.model.encoder import build_encoder
    from ootd.model.export import load

    baseline = frozen_baseline(evaluated["model_dir"]).visual.trunk
    start = build_encoder(tiny_config.model).visual.trunk
    tuned = load(evaluated["model_dir"]).visual.trunk
    states = (baseline.state_dict().items(), start.state_dict().values(), tuned.state_dict().values())
    for (name, a), b, c in zip(*states, strict=True):
        assert torch.equal(a, b), name
        if name.startswith("blocks.3."):
            assert not torch.equal(a, c), f"{name}: baseline must not be the fine-tuned block"
        elif name.startswith("blocks.0."):
            assert torch.equal(a, c), name


def test_report_plots_and_config_are_written(evaluated):
    from ootd.config import load_config

    out = evaluated["out"]
    report = (out / "report.md").read_text()
    assert report == evaluated["result"]["report"]
    header = "| variant | P@1 | P@5 | P@10 | mAP@10 | nDCG@10 | MRR | silhouette |"
    assert header in report and header in evaluated["result"]["table"]
    titles = ("colour histogram · outfit crop", "frozen backbone · outfit crop", "frozen backbone · whole photo",
              "fine-tuned · outfit crop")  # fmt: skip
    for title in titles:
        assert f"| {title} | " in report
    for png in ("style_matrix.png", "precision_at_k.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({png})" in report
    saved = load_config(out / "config.yaml")
    assert saved.train.test_fraction == 0.5 and saved.model.backbone == "tiny"


def test_report_verdict_matches_the_scores(evaluated):
    result = evaluated["result"]
    tuned = result["variants"]["finetuned_crop"]["mAP@10"]
    beaten = {name: tuned > result["variants"][name]["mAP@10"] for name in ("histogram_crop", "frozen_crop")}
    report = result["report"]
    assert ("does NOT beat the colour histogram" in report) == (not beaten["histogram_crop"])
    assert ("does NOT beat the frozen backbone" in report) == (not beaten["frozen_crop"])
    assert len(result["findings"]) == sum(not b for b in beaten.values())
    assert all(f in result["warnings"] for f in result["findings"])  # the CLI prints warnings


def _fake_variants(**map10: float) -> dict:
    return {name: {"mAP@10": v, "P@10": v, "MRR": v, "style_gap": 0.1, "dim": 8} for name, v in map10.items()}


def test_findings_say_plainly_when_fine_tuning_loses_to_a_baseline():
    from ootd.evaluate.report import baseline_findings, markdown_report, markdown_table

    # The issue #14 numbers: the random tiny backbone fine-tuned loses to a colour histogram of the same crops.
    variants = _fake_variants(histogram_crop=0.161, frozen_crop=0.046, finetuned_crop=0.116)
    findings = baseline_findings(variants)
    assert len(findings) == 1
    assert "does NOT beat the colour histogram · outfit crop baseline: mAP@10 0.116 vs 0.161" in findings[0]
    header = {"model_version": "v1", "model_dir": "/m", "split": "test", "val_fraction": 0.1, "test_fraction": 0.1,
              "n_images": 3, "counts": {"Chic": 3}, "baseline_backbone": "tiny",
              "embedding_dims": {"histogram": 512, "frozen": 192, "finetuned": 128}, "warnings": [],
              "skipped": {"count": 0}, "findings": findings}  # fmt: skip
    files = {"style_matrix": "/x/style_matrix.png", "precision_at_k": "/x/precision_at_k.png"}
    report = markdown_report(markdown_table(variants), variants, header, files)
    assert "## Verdict: fine-tuning does not beat its baselines" in report and findings[0] in report

    assert len(baseline_findings(_fake_variants(histogram_crop=0.2, frozen_crop=0.3, finetuned_crop=0.25))) == 1
    assert len(baseline_findings(_fake_variants(histogram_crop=0.3, frozen_crop=0.3, finetuned_crop=0.3))) == 2
    winning = _fake_variants(histogram_crop=0.161, frozen_crop=0.2, finetuned_crop=0.5)
    assert baseline_findings(winning) == []
    report = markdown_report(markdown_table(winning), winning, {**header, "findings": []}, files)
    assert "beats both baselines on mAP@10 (colour histogram · outfit crop +0.339" in report


def test_color_histogram_values():
    from ootd.evaluate.metrics import color_histogram

    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0] = (255, 0, 0)  # 3 red pixels, 3 black
    hist = color_histogram(pixels)
    assert hist.shape == (512,) and hist.sum() == pytest.approx(1.0)
    assert hist[0] == pytest.approx(0.5) and hist[7 * 64] == pytest.approx(0.5)
    assert color_histogram(np.zeros((0, 4, 3), dtype=np.uint8)).sum() == 0
    with pytest.raises(ValueError, match="RGB"):
        color_histogram(np.zeros((4, 4)))


def test_split_too_small_says_so(evaluated, tmp_path):
    from ootd.evaluate.run import evaluate

    with pytest.raises(ValueError, match="too small to evaluate.*at least 2 images in each of at least 2 styles"):
        evaluate(evaluated["model_dir"], evaluated["crops"], tmp_path, split="test", val_fraction=0.0,
                 test_fraction=0.001, progress=False)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_bad_inputs_raise_clear_errors(evaluated, tmp_path):
    from ootd.evaluate.run import evaluate
    from ootd.model.encoder import ModelNotAvailable

    with pytest.raises(FileNotFoundError, match="no crops table"):
        evaluate(evaluated["model_dir"], tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(evaluated["model_dir"], evaluated["crops"], tmp_path / "out", split="holdout", progress=False)
    with pytest.raises(ModelNotAvailable, match="not an exported ootd model dir"):
        evaluate(tmp_path, evaluated["crops"], tmp_path / "out", **SPLIT, progress=False)


def test_job_main_prints_the_table(evaluated, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", Path(__file__).parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--model-dir", str(evaluated["model_dir"]), "--crops", str(evaluated["crops"]), "--out", str(tmp_path),
            "--config", "tiny", "--set", "train.val_fraction=0.0", "--set", "train.test_fraction=0.5",
            "--no-progress"]  # fmt: skip
    assert job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fine-tuned · outfit crop |" in printed
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == evaluated["result"]["n_images"]
    assert job.main([*argv[:6], "--split", "test", "--set", "train.test_fraction=0.001", "--no-progress"]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.slow
def test_job_under_ray_job_submit(ray_cluster, evaluated, tmp_path):
    out = tmp_path / "job-eval"
    proc = ray_cluster.submit_job(
        "jobs/evaluate.py", "--model-dir", str(evaluated["model_dir"]), "--crops", str(evaluated["crops"]),
        "--out", str(out), "--config", "tiny", "--set", "train.val_fraction=0.0", "--set", "train.test_fraction=0.5",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| fine-tuned · whole photo |" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == evaluated["result"]["n_images"]


def test_a_near_duplicate_group_stays_in_its_representatives_split(tmp_path):
    """A repost whose own id hashes into another split is evaluated with (or without) its original, never apart."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ootd.evaluate.run import select_split
    from ootd.splits import split_of

    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    tests = [i for i in ids if split_of(i, 0.15, 0.15) == "test"]
    trains = [i for i in ids if split_of(i, 0.15, 0.15) == "train"]
    original, repost = tests[0], trains[0]
    rows = [{"image_id": i, "source": i, "style": "Casual" if k % 2 else "Chic", "crop": b"x",
             "near_dup_of": original if i == repost else None} for k, i in enumerate([*tests[:8], *trains[:8]])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    # An older file without the column reads as "no group".
    old = [{"image_id": i, "source": i, "style": "Casual", "crop": b"x"} for i in tests[8:10]]
    pq.write_table(pa.Table.from_pylist(old), tmp_path / "part-1.parquet")

    selected, _ = select_split(sorted(tmp_path.glob("*.parquet")), "test", 0.15, 0.15)
    assert repost in selected and original in selected and set(tests[:10]) <= set(selected)
    train_selected, _ = select_split(sorted(tmp_path.glob("*.parquet")), "train", 0.15, 0.15)
    assert repost not in train_selected
