"""RISCLIP processor: CLIP tokenizer + CLIP image processor at the model's square input size."""

from typing import Optional

from transformers import CLIPConfig, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import Unpack

from ...processing_utils import (
    PROCESSOR_KWARGS_DEFAULTS, ReferringSegmentationProcessorKwargs, ReferringSegmentationProcessorMixin, load_clip_parts,
)
from .configuration_risclip import PAPER_GRID


class RisclipProcessorKwargs(ReferringSegmentationProcessorKwargs, total=False):
    """Typed keyword arguments of `RisclipProcessor.__call__`: tokenizer arguments and `return_tensors`
    (padding to the longest expression)."""

    _defaults = PROCESSOR_KWARGS_DEFAULTS


class RisclipProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    r"""
    Prepares images, referring expressions and (optionally) masks for [`RisclipModel`].

    Images are resized straight to `image_size` x `image_size` (no centre crop, CLIP's bicubic resampling,
    mean and std); expressions are tokenised with CLIP's tokenizer (padded to the longest, truncated to the
    tokenizer's `model_max_length`). RISCLIP fuses image and text inside the encoders, so every
    image-text pair is encoded on its own: one image with N expressions becomes N rows of
    `pixel_values` (the image is resized and normalised once and repeated).

    Args:
        image_processor (`CLIPImageProcessor`): CLIP's image processor (its mean/std are used).
        tokenizer (`CLIPTokenizer`): CLIP's tokenizer.
        image_size (`int`, *optional*, defaults to 640): side of the square model input; must equal the
            model's `config.image_size`.
        threshold (`float`, *optional*, defaults to 0.5): default threshold of
            `post_process_referring_segmentation` (the model config's `threshold`).

    Example:

    ```python
    >>> processor = RisclipProcessor.from_backbones(clip="openai/clip-vit-base-patch16")  # 640 px
    >>> inputs = processor(images=image, text=["the red circle", "the square on the left"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    kwargs_class = RisclipProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, image_size: int = 640, threshold: float = 0.5):
        super().__init__(image_processor, tokenizer)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
        self.image_size = image_size
        self.threshold = threshold

    @classmethod
    def from_backbones(
        cls, clip: str, image_size: Optional[int] = None, threshold: float = 0.5, **loading
    ) -> "RisclipProcessor":
        """The processor matching `RisclipModel.from_backbones(clip=...)`.

        Args:
            clip (`str` or `os.PathLike`): the CLIP checkpoint (Hub id or folder) the model is built on.
            image_size (`int`, *optional*): defaults to 40 x the checkpoint's patch size, as the model's
                default (640 for ViT-B/16, 560 for ViT-L/14).
            threshold (`float`): default post-processing threshold.
            **loading: passed to the `from_pretrained` calls (`revision`, `cache_dir`, `token`, ...).
        """
        if image_size is None:
            image_size = PAPER_GRID * int(CLIPConfig.from_pretrained(clip, **loading).vision_config.patch_size)
        image_processor, tokenizer = load_clip_parts(clip, image_size, **loading)
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size, threshold=threshold)

    def __call__(self, images=None, text=None, masks=None, **kwargs: Unpack[RisclipProcessorKwargs]) -> BatchFeature:
        """Encode image-text pairs (and masks).

        Args:
            images: one image or a list (PIL of any mode, numpy, torch, paths); one image pairs with every
                expression, N images with N expressions or N lists of expressions.
            text (`str` or list): the referring expressions.
            masks (*optional*): one ground-truth mask per pair, each of its image's size.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            **kwargs: `RisclipProcessorKwargs`: tokenizer arguments, flat (`max_length=8`) or as `text_kwargs`
                (defaults: padding to the longest expression, truncation at CLIP's length).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S), `input_ids` and `attention_mask` (B, T),
            `original_sizes` (B, 2) long (height, width), and `labels` (B, S, S) float 0/1 when `masks` are
            given; S = `image_size`, B = number of pairs.
        """
        text_kwargs, return_tensors = self.tokenizer_kwargs(kwargs)
        inputs = self.prepare_referring_inputs(images, text, masks)
        return self.encode_square_pairs(inputs, return_tensors, **text_kwargs)

    @property
    def model_input_names(self) -> list:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["RisclipProcessor", "RisclipProcessorKwargs"]
