"""CRIS (Wang et al.): fine-tuned CLIP, cross-modal neck, vision-language decoder, dynamic-kernel projector.

Importing this package registers `CrisConfig` (`model_type="cris"`), `CrisModel` and `CrisProcessor`
with `AutoConfig`, `AutoModel` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_cris import CrisConfig
from .modeling_cris import CrisModel, CrisPreTrainedModel
from .processing_cris import CrisProcessor

AutoConfig.register("cris", CrisConfig, exist_ok=True)
AutoModel.register(CrisConfig, CrisModel, exist_ok=True)
AutoProcessor.register(CrisConfig, CrisProcessor, exist_ok=True)

__all__ = ["CrisConfig", "CrisModel", "CrisPreTrainedModel", "CrisProcessor"]
