"""How well could style be retrieved from perfectly perceived garment attributes? A ceiling for the tiny demo.

The demo's photos (13 styles x 60, seed 0) are re-drawn with a wardrobe that records what the renderer was told
to paint: dress or top + bottom, bottom kind, outer and its length, sleeves, every garment's pattern and colours
(snapped to the nearest palette colour) and the style's fit. No pixels are looked at. Retrieval on those
attribute vectors, scored like `ootd evaluate` (mAP@10, every test photo queries the others), shows whether the
styles are separable at all (the generator's overlap) or whether what is missing is perception (the trunk).

    .venv/bin/python benchmarks/attribute_ceiling.py      # writes benchmarks/results/attribute_ceiling.md

The split here is a seeded 70/15/15 permutation, not `ootd.splits` by image id: the figures are a ceiling for
the same data size, not the demo's exact test set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ootd import synthetic  # noqa: E402
from ootd.evaluate.metrics import retrieval_metrics  # noqa: E402
from ootd.styles import STYLES  # noqa: E402

LOOKS = synthetic._LOOKS
COLOURS = sorted({c for look in LOOKS.values() for c in look.palette})
PATTERNS = sorted({p for look in LOOKS.values() for p in look.patterns})
BOTTOMS = ("slim", "straight", "wide", "flare", "shorts", "skirt", "long_skirt")


class RecordingWardrobe(synthetic._StyleWardrobe):
    """A style's wardrobe that writes down every answer it gives the renderer (same draws, same photo)."""

    def __init__(self, look):
        super().__init__(look)
        self.log: dict = {"fills": []}

    def dress(self, rng):
        self.log["dress"] = super().dress(rng)
        return self.log["dress"]

    def bottom(self, rng):
        self.log["bottom"] = super().bottom(rng)
        return self.log["bottom"]

    def outer_hem(self, rng):
        self.log["hem"] = super().outer_hem(rng)
        return self.log["hem"]

    def long_sleeve(self, rng):
        self.log["sleeve"] = super().long_sleeve(rng)
        return self.log["sleeve"]

    def fill(self, cls, rng):
        kind, colours = super().fill(cls, rng)
        self.log["fills"].append((cls, kind, colours))
        return kind, colours


def nearest_palette_colour(rgb) -> int:
    """Index into COLOURS of the palette colour a jittered garment colour was drawn from."""
    return int(np.argmin([sum((a - b) ** 2 for a, b in zip(rgb, p, strict=True)) for p in COLOURS]))


def attribute_vector(log: dict, fit: float) -> np.ndarray:
    """One-hot attributes per garment class; the first colour (the garment's body) counts double."""
    head = [float(log.get("dress", False)), float(log.get("hem") is not None), log.get("hem") or 0.0,
            float(log.get("sleeve", False)), fit]
    bottom = np.zeros(len(BOTTOMS))
    if log.get("bottom"):
        bottom[BOTTOMS.index(log["bottom"])] = 1.0
    parts = [np.array(head), bottom]
    for cls in range(4):
        pattern, colour = np.zeros(len(PATTERNS)), np.zeros(len(COLOURS))
        for c, kind, colours in log["fills"]:
            if c == cls:
                pattern[PATTERNS.index(kind)] = 1.0
                for i, rgb in enumerate(colours):
                    colour[nearest_palette_colour(rgb)] += 1.0 if i == 0 else 0.5
        parts += [pattern, colour]
    return np.concatenate(parts)


def draw(per_style: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Attribute vectors and style codes of the photos `write_sample_data(per_style, seed)` would draw."""
    vectors, codes = [], []
    for s, style in enumerate(STYLES):
        for i in range(per_style):
            wardrobe = RecordingWardrobe(LOOKS[style])
            synthetic.render_outfit(style, np.random.default_rng([seed, s, i]), 256, wardrobe=wardrobe)
            vectors.append(attribute_vector(wardrobe.log, LOOKS[style].fit))
            codes.append(s)
    return np.array(vectors), np.array(codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-style", type=int, default=60, help="the demo's count")
    parser.add_argument("--large-per-style", type=int, default=200, help="a larger training set, another seed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attribute_ceiling.md")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    x, y = draw(args.per_style, seed=0)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[: int(0.7 * len(y))], order[-int(0.15 * len(y)):]
    rows = [("attribute vectors, cosine, no learning", retrieval_metrics(x[test], y[test]))]
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x[train], y[train])
    rows.append((f"logistic regression on {len(train)} training photos, class probabilities",
                 retrieval_metrics(clf.predict_proba(x[test]), y[test])))
    x_big, y_big = draw(args.large_per_style, seed=1)
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_big, y_big)
    rows.append((f"logistic regression on {len(y_big)} photos of another seed",
                 retrieval_metrics(clf.predict_proba(x[test]), y[test])))
    lines = [f"## attribute_ceiling (demo data: {len(STYLES)} styles x {args.per_style}, {len(test)} test photos)",
             "", "| embedding from the true attributes | P@1 | P@10 | mAP@10 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['P@1']:.3f} | {m['P@10']:.3f} | {m['mAP@10']:.3f} |" for name, m in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
