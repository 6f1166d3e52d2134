"""The four methods. Importing this package registers them with the transformers Auto classes."""

from .risclip import RisclipConfig, RisclipModel, RisclipProcessor

__all__ = ["RisclipConfig", "RisclipModel", "RisclipProcessor"]
