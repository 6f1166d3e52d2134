"""The "referring-image-segmentation" pipeline.

Importing this module registers the task with `transformers.pipelines.PIPELINE_REGISTRY`, so once
`refseg` is imported:

    >>> from transformers import pipeline
    >>> segmenter = pipeline("referring-image-segmentation", model="path/to/risclip")
    >>> results = segmenter("street.jpg", text=["the man on the left", "the red car"])
    >>> results[0]["mask"].size == Image.open("street.jpg").size
    True

`refseg.hub.export` copies this module into exported folders and declares it under
`custom_pipelines` in `config.json`, so `pipeline("referring-image-segmentation", model=<exported
folder or Hub id>, trust_remote_code=True)` works without refseg. For such folders transformers asks
for `trust_remote_code=True` even when refseg is imported (the folder declares custom pipeline code);
pass it, or use `load_pipeline(folder)`, which names `pipeline_class=ReferringImageSegmentationPipeline`.

Inputs: an image (PIL image of any mode, numpy array, torch tensor, file path or http(s) URL) and
`text`, one expression or a list of them; or a dict `{"image": ..., "text": ...}`; or a list of
either (one result list per image). Output per image: a list with one dict per expression, in order:

- `"score"`, `"label"`, `"mask"`, as transformers' `image-segmentation` pipeline gives them; `"label"`
  is the expression;
- `"text"`: the expression too (the name of earlier refseg releases);
- `"mask"`: `PIL.Image` of mode "L" with values 0 / 255 at the image's size (after EXIF rotation),
  from the processor's `post_process_referring_segmentation`;
- `"no_target"`: `True` when the expression is judged to have no referent in the image (generalized
  referring segmentation, `refseg.no_target`); the mask is then empty;
- `"score"`: depends on whether the model answers "is the referent there at all" (its output carries
  `no_target_logits`: a refseg method with `config.no_target_head=True`, or the SAM3 baseline, whose
  presence logit is mapped onto it):
  - with `no_target_logits`: the probability that the expression **has** a referent,
    `1 - sigmoid(no_target_logits)`, and `no_target` is `sigmoid(no_target_logits) > no_target_threshold`
    (the same rule by which post-processing empties the mask). A mask can still come back empty with
    `no_target` False, when no pixel passes the mask threshold;
  - without (the default refseg methods, CLIPSeg): the mean foreground probability (sigmoid of the
    logits) over the pixels predicted as foreground at the model's output resolution, with the same
    threshold as the mask; 0.0 when no pixel is predicted. A rough confidence in [threshold, 1] of the
    pixels the mask covers: **not a presence score**, it does not say whether the referent is in the
    image. `no_target` is then `True` exactly when the mask is empty.

The threshold is the `threshold` call/constructor argument, else the model config's `threshold`,
else the processor's default. The no-target threshold is the `no_target_threshold` call/constructor
argument, else the model config's `no_target_threshold`, else the processor's, else 0.5; it is
passed to `post_process_referring_segmentation(..., no_target_threshold=...)`, and ignored for a
model without `no_target_logits`.

Models from outside refseg (the baselines of `refseg.baselines`: stock CLIPSeg, SAM3) join in two
steps, without a per-model branch here. (1) The task loads its model with
`AutoModelForReferringImageSegmentation` first, an Auto class whose mapping holds only the config
types registered with it (`refseg.baselines` registers `CLIPSegConfig` and `Sam3Config`); any other
config (our four methods) falls through to `AutoModel`. This matters because `AutoModel` maps
`clipseg` to `CLIPSegModel`, which has no segmentation head. (2) A model class that defines
`adapt_processor(processor)` gets the stock processor the pipeline loaded (`CLIPSegProcessor`, ...)
and returns one with refseg's processor contract (`processor(images=, text=)`,
`post_process_referring_segmentation`).

`pipeline(TASK, model=..., dtype=torch.bfloat16)` (or `load_pipeline(..., dtype=...)`) loads the model
in that dtype: the processor's floating inputs are cast to the model's dtype, and the logits are
upcast to float32 before the masks and scores are made.

Only torch, numpy, PIL, transformers and `processing_utils` are imported, so the module travels
with exported model code.
"""

import logging
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY

from .processing_utils import load_image

logger = logging.getLogger(__name__)

TASK = "referring-image-segmentation"


def _load_pipeline_image(image, timeout=None) -> Image.Image:
    """RGB PIL image from a URL (via transformers) or anything `processing_utils.load_image` reads."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        from transformers.image_utils import load_image as load_remote_image

        image = load_remote_image(image, timeout=timeout)
    return load_image(image)


class AutoModelForReferringImageSegmentation(_BaseAutoModelClass):
    """Auto class of the models that serve the task where `AutoModel` would pick another class.

    Empty until classes are registered (`AutoModelForReferringImageSegmentation.register(CLIPSegConfig,
    ClipsegReferringModel)`, done by `refseg.baselines`); `from_pretrained` of any other config type
    raises `ValueError`, and the pipeline then loads the model with `AutoModel`.
    """

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


class ReferringImageSegmentationPipeline(Pipeline):
    """Segment the object each referring expression describes (see the module docstring).

    Args (constructor, besides `Pipeline`'s):
        threshold (`float`, *optional*): default mask threshold for every call.
        no_target_threshold (`float`, *optional*): default no-target threshold for every call (models with
            `no_target_logits` only).

    Call:
        `pipe(image, text="...", threshold=None, no_target_threshold=None, timeout=None)`; `image` may also
        be a dict `{"image", "text"}` or a list of images / dicts.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "`processor` is required: pass the model's processor, or a model folder/Hub id that holds one"
            )
        if not hasattr(self.processor, "post_process_referring_segmentation"):
            adapt = getattr(self.model, "adapt_processor", None)
            if adapt is None:
                raise ValueError(
                    f"`processor` ({type(self.processor).__name__}) has no `post_process_referring_segmentation` "
                    f"and the model ({type(self.model).__name__}) no `adapt_processor` to give it one"
                )
            self.processor = adapt(self.processor)

    def __call__(self, image, text=None, **kwargs):
        """Segment `text` (a string or a list of strings) in `image`; see the module docstring."""
        if text is not None:
            kwargs["text"] = text
        return super().__call__(image, **kwargs)

    def _sanitize_parameters(self, text=None, threshold=None, no_target_threshold=None, timeout=None, **kwargs):
        kwargs.pop("local_files_only", None)  # `pipeline()` forwards it to the constructor as well
        if kwargs:
            raise ValueError(f"unexpected arguments for the {TASK} pipeline: {sorted(kwargs)}")
        preprocess_params, postprocess_params = {}, {}
        if text is not None:
            preprocess_params["text"] = text
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        for name, value in (("threshold", threshold), ("no_target_threshold", no_target_threshold)):
            if value is not None:
                if not 0.0 < float(value) < 1.0:
                    raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
                postprocess_params[name] = float(value)
        return preprocess_params, {}, postprocess_params

    def preprocess(self, inputs, text=None, timeout=None):
        if isinstance(inputs, dict):
            if "image" not in inputs:
                raise ValueError("`image`: a dict input needs an 'image' key (and a 'text' key)")
            text = inputs.get("text", text)
            inputs = inputs["image"]
        if text is None:
            raise ValueError("`text` is required: pass one referring expression or a list of them")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}")
        image = _load_pipeline_image(inputs, timeout=timeout)
        model_inputs = self.processor(images=image, text=list(texts), return_tensors="pt")
        original_sizes = model_inputs.pop("original_sizes")
        return {"model_inputs": dict(model_inputs), "original_sizes": original_sizes, "texts": list(texts)}

    def _forward(self, model_inputs):
        dtype = self.model.dtype
        inputs = {
            name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in model_inputs["model_inputs"].items()
        }
        outputs = self.model(**inputs)
        forwarded = {"logits": outputs.logits, "original_sizes": model_inputs["original_sizes"],
                     "texts": model_inputs["texts"]}
        no_target_logits = getattr(outputs, "no_target_logits", None)  # (B,), models that answer "is it there"
        if no_target_logits is not None:
            forwarded["no_target_logits"] = no_target_logits
        return forwarded

    def postprocess(self, model_outputs, threshold=None, no_target_threshold=None):
        logits = model_outputs["logits"].float()  # (B, h, w)
        no_target_logits = model_outputs.get("no_target_logits")
        if no_target_logits is not None:
            no_target_logits = no_target_logits.float()
        if threshold is None:
            threshold = getattr(self.model.config, "threshold", None)
        if no_target_threshold is None:
            no_target_threshold = getattr(self.model.config, "no_target_threshold", None)
        if no_target_threshold is None:
            no_target_threshold = getattr(self.processor, "no_target_threshold", None) or 0.5
        # the processor empties the masks of rows judged to have no referent, by the threshold used below
        outputs = SimpleNamespace(logits=logits, no_target_logits=no_target_logits)
        masks = self.processor.post_process_referring_segmentation(
            outputs, target_sizes=model_outputs["original_sizes"], threshold=threshold,
            no_target_threshold=no_target_threshold,
        )
        if threshold is None:
            threshold = getattr(self.processor, "threshold", 0.5)
        probabilities = logits.sigmoid()
        if no_target_logits is not None:  # the same comparison as the processor's, so flag and mask agree
            absent = no_target_logits.sigmoid()  # (B,)
            absent_rows = (absent > no_target_threshold).tolist()
        results = []
        for row, (text, mask, probability) in enumerate(zip(model_outputs["texts"], masks, probabilities)):
            if no_target_logits is None:  # no presence: the mask's own confidence, no target = nothing predicted
                foreground = probability > threshold
                score = float(probability[foreground].mean()) if bool(foreground.any()) else 0.0
                no_target = not bool(mask.any())
            else:  # the probability that the expression has a referent
                score, no_target = 1.0 - float(absent[row]), bool(absent_rows[row])
            pixels = mask.cpu().numpy().astype(np.uint8) * 255
            results.append({"score": score, "label": text, "mask": Image.fromarray(pixels),  # uint8 (h, w) -> "L"
                            "no_target": no_target, "text": text})
        return results


def load_pipeline(model, **kwargs) -> ReferringImageSegmentationPipeline:
    """`transformers.pipeline(TASK, model=model, pipeline_class=ReferringImageSegmentationPipeline, **kwargs)`.

    Naming the class keeps folders exported with remote code (which declare `custom_pipelines`) on
    this module's code, with no `trust_remote_code`; the model and processor load through the Auto
    classes as usual.
    """
    from transformers import pipeline

    return pipeline(TASK, model=model, pipeline_class=ReferringImageSegmentationPipeline, **kwargs)


if TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ReferringImageSegmentationPipeline,
        pt_model=(AutoModelForReferringImageSegmentation, AutoModel), type="multimodal",
    )

__all__ = ["TASK", "AutoModelForReferringImageSegmentation", "ReferringImageSegmentationPipeline", "load_pipeline"]
