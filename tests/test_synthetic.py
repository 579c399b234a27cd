"""Tests for the synthetic outfit generator: determinism, ground-truth boxes, YOLO set, manifest and visual sanity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ootd.styles import GARMENT_CLASSES, STYLES
from ootd.synthetic import MIN_SIZE, SyntheticPhoto, render_outfit, write_sample_data

SIZE = 160
PER_STYLE = 5


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synthetic_a") / "set"
    summary = write_sample_data(out, per_style=PER_STYLE, seed=3, size=SIZE)
    return out, summary, pd.read_parquet(out / "manifest.parquet")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _union(boxes) -> list[int]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def test_same_seed_gives_identical_bytes_in_any_folder(sample, tmp_path):
    out, _, _ = sample
    again = tmp_path / "elsewhere" / "deeper"
    write_sample_data(again, per_style=PER_STYLE, seed=3, size=SIZE)
    first, second = _files(out), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) == 13 * PER_STYLE * 3 + 2  # style jpg + yolo jpg + label per photo, data.yaml, manifest
    assert all(first[name] == second[name] for name in first)


def test_different_seed_changes_every_image(sample, tmp_path):
    out, _, manifest = sample
    other = tmp_path / "other"
    write_sample_data(other, per_style=PER_STYLE, seed=4, size=SIZE)
    assert all((out / p).read_bytes() != (other / p).read_bytes() for p in manifest["path"])


def test_subset_of_styles_reproduces_the_same_photos(sample, tmp_path):
    out, _, _ = sample
    summary = write_sample_data(tmp_path / "sub", per_style=2, seed=3, size=SIZE, styles=["Retro", "Chic"])
    assert summary["per_style"] == {"Retro": 2, "Chic": 2} and summary["n_images"] == 4
    for name in ("Chic/chic_00000.jpg", "Chic/chic_00001.jpg", "Retro/retro_00001.jpg"):
        assert (tmp_path / "sub" / "images" / name).read_bytes() == (out / "images" / name).read_bytes()


def test_manifest_columns_counts_and_splits(sample):
    out, summary, manifest = sample
    assert list(manifest.columns) == [
        "path", "style", "split", "width", "height", "garment_classes", "garment_boxes", "outfit_box",
    ]
    assert manifest["path"].tolist() == sorted(manifest["path"])
    assert manifest.groupby("style").size().to_dict() == {s: PER_STYLE for s in STYLES}
    assert set(manifest.groupby("style")["split"].nunique()) == {2}  # every style in train and val
    assert summary["n_images"] == len(manifest) == 13 * PER_STYLE
    assert summary["splits"] == manifest["split"].value_counts().to_dict()
    assert summary["per_style"] == {s: PER_STYLE for s in STYLES}
    for row in manifest.itertuples():
        assert row.path == f"images/{row.style}/{Path(row.path).name}"
        assert Path(row.path).name.startswith(f"{row.style.lower()}_")
        with Image.open(out / row.path) as img:
            assert img.size == (row.width, row.height) == (SIZE, SIZE) and img.mode == "RGB"
            assert not img.info.get("exif")


def test_boxes_inside_nondegenerate_and_outfit_is_their_union(sample):
    _, _, manifest = sample
    for row in manifest.itertuples():
        boxes = [list(b) for b in row.garment_boxes]
        assert len(boxes) == len(row.garment_classes) >= 1
        assert set(row.garment_classes) <= set(range(len(GARMENT_CLASSES)))
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= row.width and 0 <= y1 < y2 <= row.height
            assert x2 - x1 >= 3 and y2 - y1 >= 3
        assert list(row.outfit_box) == _union(boxes)
        classes = set(row.garment_classes)
        assert (3 in classes) != ({0, 1} <= classes)  # a dress, or a top with a bottom
    assert manifest["garment_classes"].map(lambda c: 2 in c).any()  # some outfits carry an outer layer
    assert manifest["garment_classes"].map(lambda c: 3 in c).any()


def test_yolo_labels_match_manifest(sample):
    out, summary, manifest = sample
    data = yaml.safe_load((out / "yolo" / "data.yaml").read_text())
    assert data == {"train": "images/train", "val": "images/val", "nc": 4, "names": list(GARMENT_CLASSES)}
    assert summary["data_yaml"] == str(out / "yolo" / "data.yaml")
    for row in manifest.itertuples():
        name = Path(row.path).stem
        image = out / "yolo" / "images" / row.split / f"{name}.jpg"
        assert image.read_bytes() == (out / row.path).read_bytes()
        other = "val" if row.split == "train" else "train"
        assert not (out / "yolo" / "images" / other / f"{name}.jpg").exists()
        lines = (out / "yolo" / "labels" / row.split / f"{name}.txt").read_text().splitlines()
        assert len(lines) == len(row.garment_classes)
        for line, cls, box in zip(lines, row.garment_classes, row.garment_boxes, strict=True):
            fields = line.split()
            assert int(fields[0]) == cls and all(len(f.split(".")[1]) == 6 for f in fields[1:])
            cx, cy, w, h = (float(f) for f in fields[1:])
            decoded = [(cx - w / 2) * SIZE, (cy - h / 2) * SIZE, (cx + w / 2) * SIZE, (cy + h / 2) * SIZE]
            assert np.allclose(decoded, list(box), atol=1.0)


def _hist(pixels: np.ndarray) -> np.ndarray:
    q = (pixels.reshape(-1, 3) // 64).astype(int)
    counts = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(float)
    return counts / counts.sum()


def test_figure_stands_out_from_a_cluttered_background(sample):
    out, _, manifest = sample
    for row in manifest.itertuples():
        pixels = np.asarray(Image.open(out / row.path).convert("RGB"))
        _, counts = np.unique(pixels.reshape(-1, 3) // 16, axis=0, return_counts=True)
        assert counts.max() / counts.sum() < 0.75  # no single colour fills the photo
        x1, y1, x2, y2 = row.outfit_box
        inside = np.zeros(pixels.shape[:2], bool)
        inside[y1:y2, x1:x2] = True
        # The outfit's colours differ from the rest of the photo (L1 distance of colour histograms, max 2).
        assert np.abs(_hist(pixels[inside]) - _hist(pixels[~inside])).sum() > 0.3


def test_figure_position_and_scale_vary(sample):
    _, _, manifest = sample
    boxes = np.array(manifest["outfit_box"].tolist(), dtype=float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    heights = boxes[:, 3] - boxes[:, 1]
    assert centres[:, 0].std() > SIZE * 0.08 and centres[:, 1].std() > SIZE * 0.05
    assert np.abs(centres[:, 0] - SIZE / 2).max() > SIZE * 0.2  # some figures far from the centre
    assert heights.max() > 1.5 * heights.min()


def test_render_outfit_is_deterministic_per_generator():
    a = render_outfit("Street", np.random.default_rng(11), 128)
    b = render_outfit("Street", np.random.default_rng(11), 128)
    c = render_outfit("Street", np.random.default_rng(12), 128)
    assert isinstance(a, SyntheticPhoto) and a.style == "Street" and a.image.size == (128, 128)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.garments == b.garments
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert list(a.outfit_box) == _union([box for _, box in a.garments])


def test_crops_separate_styles_better_than_whole_photos(sample):
    """Nearest-centroid on colour histograms: the crop carries the style, the whole photo mostly background."""
    out, _, manifest = sample
    crop, whole = [], []
    for row in manifest.itertuples():
        pixels = np.asarray(Image.open(out / row.path).convert("RGB"))
        x1, y1, x2, y2 = row.outfit_box
        crop.append(_hist(pixels[y1:y2, x1:x2]))
        whole.append(_hist(pixels))
    styles, train = manifest["style"].to_numpy(), (manifest["split"] == "train").to_numpy()

    def accuracy(features: list[np.ndarray]) -> float:
        x = np.array(features)
        centroids = np.array([x[train & (styles == s)].mean(0) for s in STYLES])
        predicted = np.array(STYLES)[((x[~train, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        return float((predicted == styles[~train]).mean())

    crop_acc, whole_acc = accuracy(crop), accuracy(whole)
    assert crop_acc >= 0.4 and crop_acc > whole_acc + 0.2


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown style"):
        render_outfit("Goth", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least"):
        render_outfit("Chic", np.random.default_rng(0), MIN_SIZE - 1)
    for kwargs, message in (
        ({"styles": ["Chic", "Goth"]}, "styles"),
        ({"styles": ["Chic", "Chic"]}, "styles"),
        ({"per_style": 0}, "per_style"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"size": 32}, "size"),
    ):
        with pytest.raises(ValueError, match=message):
            write_sample_data(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_existing_set_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    write_sample_data(out, per_style=3, seed=1, size=MIN_SIZE, styles=["Minimal"])
    keep = out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_sample_data(out, per_style=2, seed=1, size=MIN_SIZE, styles=["Minimal"])
    summary = write_sample_data(out, per_style=2, seed=1, size=MIN_SIZE, styles=["Minimal"], overwrite=True)
    assert summary["n_images"] == 2 and summary["splits"] == {"train": 1, "val": 1}
    assert sorted(p.name for p in (out / "images" / "Minimal").iterdir()) == ["minimal_00000.jpg", "minimal_00001.jpg"]
    assert len(list((out / "yolo" / "labels").rglob("*.txt"))) == 2  # stale labels of the bigger set are gone
    assert keep.read_text() == "mine"


# -- attribute mode (pretraining data: garments independent of any style) -----------------------------------------


def _attribute_photo(*seed: int, size: int = SIZE):
    from ootd.synthetic_attributes import render_attribute_outfit

    return render_attribute_outfit(np.random.default_rng(list(seed)), size)


def test_attribute_mode_is_deterministic_per_seed():
    a, b, other = _attribute_photo(5, 1), _attribute_photo(5, 1), _attribute_photo(5, 2)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.attributes == b.attributes and a.garments == b.garments and a.outfit_box == b.outfit_box
    assert a.image.tobytes() != other.image.tobytes()


def test_attribute_labels_are_valid_and_match_the_drawn_garments():
    from ootd.synthetic_attributes import ATTRIBUTES, attribute_names

    top, bottom, outer, dress = (GARMENT_CLASSES.index(n) for n in ("top", "bottom", "outer", "dress"))
    seen: dict[str, set[int]] = {name: set() for name in ATTRIBUTES}
    for i in range(40):
        photo = _attribute_photo(9, i)
        assert photo.style is None and set(photo.attributes) == set(ATTRIBUTES)
        for name, index in photo.attributes.items():
            assert 0 <= index < len(ATTRIBUTES[name])
            seen[name].add(index)
        names = attribute_names(photo.attributes)
        classes = {cls for cls, _ in photo.garments}
        if names["dress"] == "yes":
            assert top not in classes and bottom not in classes and dress in classes
            assert names["bottom"] == names["bottom_color"] == names["bottom_pattern"] == "none"
        else:
            assert dress not in classes and top in classes and names["bottom"] != "none"
        if names["outer"] == "none":
            assert outer not in classes and names["outer_color"] == names["outer_pattern"] == "none"
        assert photo.outfit_box == tuple(_union([box for _, box in photo.garments]))
    assert all(len(values) > 1 for values in seen.values())


def test_attribute_mode_never_consults_a_style(monkeypatch):
    import ootd.synthetic

    expected = _attribute_photo(3, 3)

    class NoStyles(dict):
        def __getitem__(self, key):
            raise AssertionError(f"attribute mode looked up style {key!r}")

        def items(self):
            raise AssertionError("attribute mode read the style palettes")

    monkeypatch.setattr(ootd.synthetic, "_LOOKS", NoStyles())
    again = _attribute_photo(3, 3)
    assert again.image.tobytes() == expected.image.tobytes() and again.attributes == expected.attributes


def test_sampled_attributes_are_uniform_and_mutually_independent():
    from ootd.synthetic_attributes import ATTRIBUTES, sample_attributes

    rng = np.random.default_rng(0)
    draws = [sample_attributes(rng) for _ in range(4000)]

    def cramers_v(a: str, b: str, rows: list[dict]) -> float:
        table = np.zeros((len(ATTRIBUTES[a]), len(ATTRIBUTES[b])))
        for row in rows:
            table[row[a], row[b]] += 1
        table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
        chi2 = ((table - expected) ** 2 / expected).sum()
        return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))

    upper = [d["upper_color"] for d in draws]
    counts = np.bincount(upper, minlength=len(ATTRIBUTES["upper_color"]))
    assert counts.min() > 0.7 * counts.mean()  # every colour family about equally often
    assert cramers_v("upper_color", "upper_pattern", draws) < 0.12
    assert cramers_v("upper_color", "outer", draws) < 0.12
    worn = [d for d in draws if d["bottom"] != 0]
    assert cramers_v("upper_color", "bottom_color", worn) < 0.12
    assert cramers_v("bottom", "bottom_pattern", worn) < 0.12
    assert cramers_v("fit", "upper_pattern", draws) < 0.12


def test_pattern_textures_keep_their_pixels():
    """The numpy-drawn textures are pinned to the bytes they had when the committed detector and trunk were trained
    (ootd/assets): a faster rewrite of `_pattern` must not change a pixel."""
    import hashlib

    from ootd.synthetic_render import _Figure, _pattern

    kinds = ("stripes_h", "stripes_v", "stripes_wide", "pinstripe", "checks", "tartan", "dots", "colorblock", "trim",
             "denim")  # fmt: skip
    digest = hashlib.sha256()
    for i, kind in enumerate(kinds):
        figure = _Figure(100.5 + i, 12.25, 150.0 + 3 * i)
        colours = [(200, 10, 30), (20, 40, 220), (240, 240, 10)]
        digest.update(_pattern(kind, colours, figure, np.random.default_rng(i), 192).tobytes())
    assert digest.hexdigest() == "9c5b98bd68a21b5abdb46ac8dd2c63e55d8038d4506d0a97a211163eb2be79dd"
