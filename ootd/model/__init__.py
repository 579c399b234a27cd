"""The style encoder: open_clip backbones, projection head, losses, the exported model dir."""

from ootd import lazy_exports

_EXPORTS = {"StyleEncoder": "encoder", "load": "export", "build_encoder": "encoder",
            "ModelNotAvailable": "backbones", "model_info": "modeldir", "make_loss": "losses"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
