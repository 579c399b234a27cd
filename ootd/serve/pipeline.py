"""The serve-time path from photo bytes to style embedding (decode → detect → crop → encode), without Ray."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.serve import metrics

if TYPE_CHECKING:
    from ootd.config import Config


class OutfitPipeline:
    """Photo bytes → outfit box → crop → style embedding, in batches; what the Encoder deployment runs.

    Every step is the one ingest and index use: `ootd.decode.decode`, the detector's outfit box, the crop
    stored as ingest stores it (JPEG, long side ≤ `data.crop_max_side`) and embedded from that JPEG, as the
    index job embeds crops. A photo indexed by the jobs and the same photo sent here get the same vector,
    unless it is longer than `DECODE_MAX_SIDE`: uploads are decoded reduced (`decode_bounded`), so a batch
    of them fits a replica's memory; boxes are still reported in the photo's own pixels.
    """

    def __init__(self, config: Config, model_dir: str | Path, device: str = "cpu"):
        """Loads the detector and the exported encoder once.

        Args:
            config: supplies `detect`, `data.crop_max_side`, `serve.max_image_pixels`, `model.precision` and
                `model.runtime`.
            model_dir: an exported model dir.
            device: torch device of the encoder.
        """
        from ootd.detect.yolo import Detector
        from ootd.model.export import load
        from ootd.model.runtime import build_embedder

        self.detector = Detector(config.detect)
        encoder = load(model_dir, device=device)
        self.embedder = build_embedder(encoder, config.model.runtime, config.model.precision, device)
        self.model_version: str = encoder.version
        self.embed_dim: int = encoder.embed_dim
        self.max_side = config.data.crop_max_side
        self.max_pixels = config.serve.max_image_pixels

    def run(self, images: Sequence[bytes], want_crop: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """Embeds a batch of encoded photos with one detector call and one encoder call.

        Args:
            images: encoded photos (validated by the ingress; a bad one still fails only itself).
            want_crop: per photo, whether to return the JPEG of its outfit crop (for the media store).

        Returns:
            Per photo: `embedding` (float32 array), `box`, `det_score`, `n_garments`, `fallback`, `width`,
            `height`, `model_version`, `crop` (JPEG bytes or None); or only `error` (a message).
        """

        from ootd.decode import (
            InputError,
            TooManyPixels,
            UnsupportedFormat,
            decode_bounded,
            decode_crop,
            encode_jpeg,
            to_array,
        )
        from ootd.detect.boxes import crop_image
        from ootd.serve.parsing import DECODE_MAX_SIDE

        want_crop = list(want_crop) if want_crop is not None else [False] * len(images)
        results: list[dict[str, Any]] = [{} for _ in images]
        decoded, where = [], []
        # Each stage is timed per batch (ootd_stage_seconds): which one to speed up when /v1/embed is slow.
        metrics.batch("encoder", len(images))
        with metrics.stage("decode"):
            for i, data in enumerate(images):
                try:
                    decoded.append(decode_bounded(data, self.max_pixels, DECODE_MAX_SIDE))
                    where.append(i)
                except InputError as exc:
                    # The HTTP status travels with the message: the ingress checked only the header.
                    status = (413 if isinstance(exc, TooManyPixels) else 415 if isinstance(exc, UnsupportedFormat)
                              else 422)
                    results[i] = {"error": f"could not decode the upload as an image: {exc}", "status": status}
        if not decoded:
            return results
        with metrics.stage("detect"):
            boxes = self.detector.outfit_boxes([to_array(b.image) for b in decoded])
        with metrics.stage("crop"):
            # encode_jpeg's default quality is the one ingest writes crops with.
            jpegs = [encode_jpeg(crop_image(b.image, ob.box), self.max_side)
                     for b, ob in zip(decoded, boxes, strict=True)]
            crops = [decode_crop(data) for data in jpegs]
        with metrics.stage("embed"):
            vectors = self.embedder.embed(crops, batch_size=len(crops))
        for k, i in enumerate(where):
            ob, image = boxes[k], decoded[k]
            sx, sy = image.scale  # back to the photo's own pixels when it was decoded reduced
            results[i] = {
                "embedding": vectors[k],
                "box": [min(int(v * s), side) for v, s, side in zip(ob.box, (sx, sy, sx, sy),
                                                                       (image.width, image.height) * 2,
                                                                       strict=True)],
                "det_score": float(ob.score),
                "n_garments": int(ob.n_garments),
                "fallback": bool(ob.fallback),
                "width": image.width,
                "height": image.height,
                "model_version": self.model_version,
                "crop": jpegs[k] if want_crop[i] else None,
            }
        return results
