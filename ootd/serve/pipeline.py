"""The serve-time path from photo bytes to style embedding (decode → detect → crop → encode), without Ray."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ootd.config import Config


class OutfitPipeline:
    """Photo bytes → outfit box → crop → style embedding, in batches; what the Encoder deployment runs.

    Every step is the one ingest and index use: `ootd.decode.decode`, the detector's outfit box, the crop
    stored as ingest stores it (JPEG, long side ≤ `data.crop_max_side`) and embedded from that JPEG, as the
    index job embeds crops. A photo indexed by the jobs and the same photo sent here get the same vector.
    """

    def __init__(self, config: Config, model_dir: str | Path, device: str = "cpu"):
        """Loads the detector and the exported encoder once.

        Args:
            config: supplies `detect`, `data.crop_max_side`, `data.max_image_pixels` and `model.precision`.
            model_dir: an exported model dir.
            device: torch device of the encoder.
        """
        from ootd.detect.yolo import Detector
        from ootd.model.encoder import load

        self.detector = Detector(config.detect)
        self.encoder = load(model_dir, device=device)
        self.model_version: str = self.encoder.version
        self.embed_dim: int = self.encoder.embed_dim
        self.max_side = config.data.crop_max_side
        self.max_pixels = config.data.max_image_pixels
        self.precision = config.model.precision

    def run(self, images: Sequence[bytes], want_crop: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """Embeds a batch of encoded photos with one detector call and one encoder call.

        Args:
            images: encoded photos (validated by the ingress; a bad one still fails only itself).
            want_crop: per photo, whether to return the JPEG of its outfit crop (for the media store).

        Returns:
            Per photo: `embedding` (float32 array), `box`, `det_score`, `n_garments`, `fallback`, `width`,
            `height`, `model_version`, `crop` (JPEG bytes or None); or only `error` (a message).
        """

        from ootd.decode import InputError, decode, decode_crop, encode_jpeg, to_array
        from ootd.detect.boxes import crop_image

        want_crop = list(want_crop) if want_crop is not None else [False] * len(images)
        results: list[dict[str, Any]] = [{} for _ in images]
        decoded, where = [], []
        for i, data in enumerate(images):
            try:
                decoded.append(decode(data, self.max_pixels))
                where.append(i)
            except InputError as exc:
                results[i] = {"error": f"could not decode the upload as an image: {exc}"}
        if not decoded:
            return results
        boxes = self.detector.outfit_boxes([to_array(image) for image in decoded])
        # encode_jpeg's default quality is the one ingest writes crops with.
        jpegs = [encode_jpeg(crop_image(image, ob.box), self.max_side)
                 for image, ob in zip(decoded, boxes, strict=True)]
        crops = [decode_crop(data) for data in jpegs]
        vectors = self.encoder.embed(crops, batch_size=len(crops), precision=self.precision)
        for k, i in enumerate(where):
            ob, image = boxes[k], decoded[k]
            results[i] = {
                "embedding": vectors[k],
                "box": [int(v) for v in ob.box],
                "det_score": float(ob.score),
                "n_garments": int(ob.n_garments),
                "fallback": bool(ob.fallback),
                "width": image.width,
                "height": image.height,
                "model_version": self.model_version,
                "crop": jpegs[k] if want_crop[i] else None,
            }
        return results
