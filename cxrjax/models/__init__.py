"""Model zoo: `build(config.model, rngs=...)` builds any registered model by name."""

from cxrjax.models import vit  # noqa: F401  (registers 'vit')
from cxrjax.models.registry import build, names, register
from cxrjax.models.vit import VARIANTS, VisionTransformer

__all__ = ["VARIANTS", "VisionTransformer", "build", "names", "register"]
