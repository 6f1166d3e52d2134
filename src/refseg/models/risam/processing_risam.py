"""RISAM processor: SAM's image processing (resize the longest side, normalise, pad to a square) + the CLIP
tokenizer padded/truncated to the word length."""

from typing import Optional

import torch
from PIL import Image
from transformers import ProcessorMixin, SamConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import Unpack

from ...processing_utils import (
    PROCESSOR_KWARGS_DEFAULTS, ReferringSegmentationProcessorKwargs, ReferringSegmentationProcessorMixin,
    resize_longest_side_shape, resize_masks_to_input,
)
from .configuration_risam import MIN_WORD_LENGTH


class RisamProcessorKwargs(ReferringSegmentationProcessorKwargs, total=False):
    """Typed keyword arguments of `RisamProcessor.__call__`: tokenizer arguments and `return_tensors`
    (every expression padded and truncated to the processor's `word_length`)."""

    _defaults = PROCESSOR_KWARGS_DEFAULTS


class RisamProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    r"""
    Prepares images, referring expressions and (optionally) masks for [`RisamModel`].

    Images go through SAM's own geometry: the longest side is resized to `image_size` (bilinear, rounding
    half up, at least one pixel), SAM's mean/std normalise it, and zeros pad it bottom/right to
    `image_size` x `image_size` (`SamImageProcessor` with `do_resize=False` after the resize; for every
    image SAM's processor accepts, the result is bit for bit SAM's). Masks become `labels` in the same padded
    frame. Expressions are tokenised with CLIP's tokenizer and padded / truncated to exactly `word_length`
    tokens, [SOS] and [EOS] included. One image with N expressions is processed once and repeated in N rows;
    `RisamModel` encodes it once.

    `post_process_referring_segmentation` upsamples the logits to the padded frame, crops the padding
    (the valid region follows from `target_sizes`, the original sizes) and resizes to the original size.

    Args:
        image_processor (`SamImageProcessor`): SAM's image processor (its mean/std and padding are used).
        tokenizer (`CLIPTokenizer`): CLIP's tokenizer.
        image_size (`int`, *optional*, defaults to 1024): SAM's input side; must equal the model's
            `config.image_size`.
        word_length (`int`, *optional*, defaults to 17): tokens per expression (17 for RefCOCO, 25 for
            RefCOCO+ and G-Ref); the model config's `word_length`. At least 3.
        threshold (`float`, *optional*, defaults to 0.35): default threshold of
            `post_process_referring_segmentation` (the paper's; the model config's `threshold`).

    Example:

    ```python
    >>> processor = RisamProcessor.from_backbones(sam="facebook/sam-vit-huge", clip="openai/clip-vit-base-patch16")
    >>> inputs = processor(images=image, text=["the red circle", "the square on the left"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    # model config fields the training script passes to `from_backbones` (refseg.training.modeling)
    config_fields = ("word_length", "threshold")

    kwargs_class = RisamProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, image_size: int = 1024, word_length: int = 17,
                 threshold: float = 0.35):
        super().__init__(image_processor, tokenizer)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if not isinstance(word_length, int) or word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be an int of at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {word_length!r}"
            )
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
        self.image_size = image_size
        self.padded_input_size = image_size  # post-processing crops SAM's padding
        self.word_length = word_length
        self.threshold = threshold

    @classmethod
    def from_backbones(cls, sam: str, clip: str, image_size: Optional[int] = None, word_length: int = 17,
                       threshold: float = 0.35, **loading) -> "RisamProcessor":
        """The processor matching `RisamModel.from_backbones(sam=..., clip=...)`.

        Args:
            sam (`str` or `os.PathLike`): the SAM checkpoint (its image processor).
            clip (`str` or `os.PathLike`): the CLIP checkpoint (its tokenizer).
            image_size (`int`, *optional*): defaults to the SAM checkpoint's input size (1024).
            word_length (`int`): tokens per expression, as the model config's `word_length`.
            threshold (`float`): default post-processing threshold.
            **loading: passed to the `from_pretrained` calls (`revision`, `cache_dir`, `token`, ...).
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        if image_size is None:
            image_size = int(SamConfig.from_pretrained(sam, **loading).vision_config.image_size)
        image_processor = AutoImageProcessor.from_pretrained(sam, **loading)
        image_processor.size = {"longest_edge": image_size}
        image_processor.pad_size = {"height": image_size, "width": image_size}
        tokenizer = AutoTokenizer.from_pretrained(clip, **loading)
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size,
                   word_length=word_length, threshold=threshold)

    def __call__(self, images=None, text=None, masks=None, **kwargs: Unpack[RisamProcessorKwargs]) -> BatchFeature:
        """Encode image-text pairs (and masks).

        Args:
            images: one image or a list (PIL of any mode, numpy, torch, paths); one image pairs with every
                expression, N images with N expressions or N lists of expressions.
            text (`str` or list): the referring expressions.
            masks (*optional*): one ground-truth mask per pair, each of its image's size.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            **kwargs: `RisamProcessorKwargs`: tokenizer arguments, flat or as `text_kwargs` (padding and length
                are fixed by `word_length`).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S), `input_ids` and `attention_mask` (B, word_length),
            `original_sizes` (B, 2) long (height, width), and `labels` (B, S, S) float 0/1 in the padded frame
            when `masks` are given; S = `image_size`, B = number of pairs.
        """
        text_kwargs, return_tensors = self.tokenizer_kwargs(kwargs, word_length=self.word_length)
        inputs = self.prepare_referring_inputs(images, text, masks)
        first = {}
        for pair, index in enumerate(inputs.image_indices):
            first.setdefault(index, pair)
        resized = []
        for pair in first.values():
            image = inputs.images[pair]
            height, width = resize_longest_side_shape(image.height, image.width, self.image_size)
            resized.append(image.resize((width, height), Image.BILINEAR))
        pixel_values = self.image_processor(
            resized, do_resize=False, do_pad=True, pad_size={"height": self.image_size, "width": self.image_size},
            return_tensors="pt",
        )["pixel_values"]
        rows = torch.tensor([list(first).index(i) for i in inputs.image_indices], dtype=torch.long)
        encoded = self.tokenizer(inputs.texts, return_tensors="pt", **text_kwargs)
        data = {
            "pixel_values": pixel_values[rows],
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "original_sizes": inputs.original_sizes,
        }
        if inputs.masks is not None:
            data["labels"] = resize_masks_to_input(inputs.masks, self.image_size, longest_side=True)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["RisamProcessor", "RisamProcessorKwargs"]
