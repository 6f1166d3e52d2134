"""refseg: referring image segmentation models for the Hugging Face ecosystem.

Importing `refseg` registers every config, model and processor with the `transformers`
Auto classes and the "referring-image-segmentation" pipeline. The data, metric, loss and
Hub helpers are submodules loaded on first use (`refseg.data`, `refseg.metrics`,
`refseg.losses`, `refseg.hub`) so that `import refseg` stays light.
"""

import importlib

from .modeling_outputs import ReferringSegmentationOutput
from .models import *  # noqa: F401,F403  (configs, models, processors; registers Auto classes)
from .models import __all__ as _models_all
from . import pipelines as _pipelines  # noqa: E402,F401  (registers "referring-image-segmentation")
from . import baselines as _baselines  # noqa: E402,F401  (registers CLIPSeg with the task's Auto class)

__version__ = "0.1.0"

_LAZY_SUBMODULES = {"data", "metrics", "losses", "hub", "presets", "adapters", "backbones", "training"}


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'refseg' has no attribute {name!r}")


__all__ = ["ReferringSegmentationOutput", "__version__", *_models_all]
