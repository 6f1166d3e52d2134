"""RISAM (Zhang et al.): frozen SAM image encoder and CLIP text encoder, Feature Enhancement, Mutual-Aware
Attention, Mutual-Aware Mask Decoder.

Importing this package registers `RisamConfig` (`model_type="risam"`), `RisamModel` and `RisamProcessor`
with `AutoConfig`, `AutoModel` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_risam import RisamConfig
from .modeling_risam import RisamModel, RisamPreTrainedModel
from .processing_risam import RisamProcessor

AutoConfig.register("risam", RisamConfig, exist_ok=True)
AutoModel.register(RisamConfig, RisamModel, exist_ok=True)
AutoProcessor.register(RisamConfig, RisamProcessor, exist_ok=True)

__all__ = ["RisamConfig", "RisamModel", "RisamPreTrainedModel", "RisamProcessor"]
