"""RISCLIP (Kim, Kang, Park): frozen CLIP with Backbone and Fusion Adapters, a Locator and a Refiner.

Importing this package registers `RisclipConfig` (`model_type="risclip"`), `RisclipModel` and
`RisclipProcessor` with `AutoConfig`, `AutoModel` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_risclip import RisclipConfig
from .modeling_risclip import RisclipModel, RisclipPreTrainedModel
from .processing_risclip import RisclipProcessor

AutoConfig.register("risclip", RisclipConfig, exist_ok=True)
AutoModel.register(RisclipConfig, RisclipModel, exist_ok=True)
AutoProcessor.register(RisclipConfig, RisclipProcessor, exist_ok=True)

__all__ = ["RisclipConfig", "RisclipModel", "RisclipPreTrainedModel", "RisclipProcessor"]
