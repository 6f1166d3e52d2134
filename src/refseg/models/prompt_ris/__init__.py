"""Prompt-RIS (Shang et al.): frozen CLIP with Cross-Modal Prompting, a tiny cross-attention decoder, and a frozen
SAM prompted with CLIP's mask, point and text prompts.

Importing this package registers `PromptRisConfig` (`model_type="prompt_ris"`), `PromptRisModel` and
`PromptRisProcessor` with `AutoConfig`, `AutoModel` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_prompt_ris import PromptRisConfig
from .modeling_prompt_ris import PromptRisModel, PromptRisPreTrainedModel
from .processing_prompt_ris import PromptRisProcessor

AutoConfig.register("prompt_ris", PromptRisConfig, exist_ok=True)
AutoModel.register(PromptRisConfig, PromptRisModel, exist_ok=True)
AutoProcessor.register(PromptRisConfig, PromptRisProcessor, exist_ok=True)

__all__ = ["PromptRisConfig", "PromptRisModel", "PromptRisPreTrainedModel", "PromptRisProcessor"]
