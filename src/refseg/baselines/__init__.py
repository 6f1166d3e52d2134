"""Baselines: pretrained text-prompted segmenters from transformers, behind refseg's contract.

Our four methods are refseg models; a baseline is a stock transformers model with real Hub weights
that refseg evaluates, compares and (for CLIPSeg) fine-tunes with the same pipeline, metric and
scripts. Each baseline is a thin subclass of the stock model (its weights load unchanged) plus a
wrapper of the stock processor, chosen by the config's `model_type`:

| `model_type` | model class (stock parent) | processor wrapper (stock processor) |
| --- | --- | --- |
| `clipseg` | `ClipsegReferringModel` (`CLIPSegForImageSegmentation`) | `ClipsegReferringProcessor` (`CLIPSegProcessor`) |
| `sam3` | `Sam3ReferringModel` (`Sam3Model`) | `Sam3ReferringProcessor` (`Sam3Processor`) |

Importing `refseg` registers each model class with
`refseg.pipelines.AutoModelForReferringImageSegmentation`, so
`pipeline("referring-image-segmentation", model="CIDAS/clipseg-rd64-refined")` (or `"facebook/sam3"`)
loads the baseline class (not `CLIPSegModel`, which `AutoModel` picks for `clipseg`, nor the bare
`Sam3Model`), and the pipeline wraps the stock
processor through the model's `adapt_processor`. `load_referring_model_and_processor(name)` does the
same for scripts (`scripts/evaluate.py`), for baselines and refseg models alike.
"""

from transformers import AutoModel, AutoProcessor, CLIPSegConfig, Sam3Config

from ..pipelines import AutoModelForReferringImageSegmentation
from .clipseg import DEFAULT_THRESHOLD, ClipsegReferringModel, ClipsegReferringProcessor
from .sam3 import Sam3ReferringModel, Sam3ReferringProcessor, select_referring_mask

BASELINE_MODELS = {"clipseg": (CLIPSegConfig, ClipsegReferringModel), "sam3": (Sam3Config, Sam3ReferringModel)}

for _config_class, _model_class in BASELINE_MODELS.values():
    AutoModelForReferringImageSegmentation.register(_config_class, _model_class, exist_ok=True)


def load_referring_model_and_processor(name_or_path, **kwargs):
    """`(model, processor)` for any model the pipeline serves: a baseline (`BASELINE_MODELS`, by the
    config's `model_type`) with its processor wrapped, or a refseg model through `AutoModel` /
    `AutoProcessor`. `kwargs` go to both `from_pretrained` calls (`revision`, `cache_dir`, ...)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    if config.model_type in BASELINE_MODELS:
        model = AutoModelForReferringImageSegmentation.from_pretrained(name_or_path, config=config, **kwargs)
    else:
        model = AutoModel.from_pretrained(name_or_path, config=config, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    if not hasattr(processor, "post_process_referring_segmentation"):
        adapt = getattr(model, "adapt_processor", None)
        if adapt is None:
            raise ValueError(f"`name_or_path` {str(name_or_path)!r}: {type(model).__name__} is not a referring "
                             f"segmentation model (no refseg processor, no `adapt_processor`)")
        processor = adapt(processor)
    return model, processor


__all__ = [
    "BASELINE_MODELS", "DEFAULT_THRESHOLD", "ClipsegReferringModel", "ClipsegReferringProcessor",
    "Sam3ReferringModel", "Sam3ReferringProcessor", "load_referring_model_and_processor", "select_referring_mask",
]
