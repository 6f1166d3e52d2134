"""The four methods. Importing this package registers them with the transformers Auto classes."""

from .cris import CrisConfig, CrisModel, CrisProcessor
from .prompt_ris import PromptRisConfig, PromptRisModel, PromptRisProcessor
from .risam import RisamConfig, RisamModel, RisamProcessor
from .risclip import RisclipConfig, RisclipModel, RisclipProcessor

__all__ = ["CrisConfig", "CrisModel", "CrisProcessor", "PromptRisConfig", "PromptRisModel", "PromptRisProcessor", "RisamConfig", "RisamModel", "RisamProcessor", "RisclipConfig", "RisclipModel", "RisclipProcessor"]
