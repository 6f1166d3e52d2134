"""Prompt-RIS processor: one image, two geometries of the same frame (CLIP's input and SAM's input), and the
CLIP tokenizer padded/truncated to the word length."""

from typing import Optional

import torch
from PIL import Image
from transformers import CLIPConfig, ProcessorMixin, SamConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import Unpack

from ...processing_utils import (
    PROCESSOR_KWARGS_DEFAULTS, ReferringSegmentationProcessorKwargs, ReferringSegmentationProcessorMixin,
    resize_longest_side_shape, resize_masks_to_input,
)
from .configuration_prompt_ris import MIN_WORD_LENGTH, PAPER_GRID


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


class PromptRisProcessorKwargs(ReferringSegmentationProcessorKwargs, total=False):
    """Typed keyword arguments of `PromptRisProcessor.__call__`: tokenizer arguments and `return_tensors`
    (every expression padded and truncated to the processor's `word_length`)."""

    _defaults = PROCESSOR_KWARGS_DEFAULTS


class PromptRisProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    r"""
    Prepares images, referring expressions and (optionally) masks for [`PromptRisModel`].

    Every image is encoded twice, in one geometry: SAM's resize-longest-side-and-pad.

    - `sam_pixel_values`: SAM's own processing (as `RisamProcessor`): the longest side resized to `sam_image_size`
      (bilinear, rounding half up), SAM's mean/std, zeros padded bottom/right to `sam_image_size` squared
      (`SamImageProcessor` with `do_resize=False`).
    - `pixel_values`: CLIP's image processing (its bicubic resize, rescale, mean/std) to the same shape at
      `image_size`, the longest side resized to `image_size` (rounding half up), then zeros (CLIP's mean colour)
      padded bottom/right to `image_size` squared.

    Decision: CLIP's input is letterboxed like SAM's, not stretched to the square (as CRIS and RISCLIP do), so that
    CLIP's token grid and SAM's frame cover the same square: the coarse map S'_C is upsampled straight into SAM's
    mask frame for the mask and point prompts (Sec. 3.1 upsamples it without any warp), `coarse_logits` and
    `logits` share one frame, and one post-processing (crop SAM's padding) serves both. It costs the tokens of
    the padded side (a 4:3 image uses 30 x 23 of 30 x 30).

    Masks become `labels` in SAM's padded frame (`sam_image_size` squared). Expressions are tokenised with CLIP's
    tokenizer and padded / truncated to exactly `word_length` tokens, [SOS] and [EOS] included. One image with N
    expressions is processed once and repeated in N rows; `PromptRisModel` runs SAM's image encoder on it once.

    `post_process_referring_segmentation` upsamples the logits to SAM's padded frame, crops the padding (the
    valid region follows from `target_sizes`, the original sizes), resizes to the original size and thresholds
    the sigmoid at `threshold`.

    Args:
        image_processor (`CLIPImageProcessor`): CLIP's image processor (its resampling, mean and std).
        sam_image_processor (`SamImageProcessor`): SAM's image processor (its mean, std and padding).
        tokenizer (`CLIPTokenizer`): CLIP's tokenizer.
        image_size (`int`, *optional*, defaults to 480): CLIP's input side; the model config's `image_size`.
        sam_image_size (`int`, *optional*, defaults to 1024): SAM's input side; the model config's `sam_image_size`.
        word_length (`int`, *optional*, defaults to 20): tokens per expression; the model config's `word_length`.
        threshold (`float`, *optional*, defaults to 0.5): default threshold of `post_process_referring_segmentation`.

    Example:

    ```python
    >>> processor = PromptRisProcessor.from_backbones(clip="openai/clip-vit-base-patch16", sam="facebook/sam-vit-base")
    >>> inputs = processor(images=image, text=["the red circle", "the square on the left"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    # model config fields the training script passes to `from_backbones` (refseg.training.modeling)
    config_fields = ("word_length", "threshold", "sam_image_size")

    kwargs_class = PromptRisProcessorKwargs

    def __init__(self, image_processor=None, sam_image_processor=None, tokenizer=None, image_size: int = 480,
                 sam_image_size: int = 1024, word_length: int = 20, threshold: float = 0.5):
        super().__init__(image_processor, sam_image_processor, tokenizer)
        _positive_int("image_size", image_size)
        _positive_int("sam_image_size", sam_image_size)
        if not isinstance(word_length, int) or word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be an int of at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {word_length!r}"
            )
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
        self.image_size = image_size
        self.sam_image_size = sam_image_size
        self.padded_input_size = sam_image_size  # post-processing crops SAM's padding
        self.word_length = word_length
        self.threshold = threshold

    @classmethod
    def from_backbones(cls, clip: str, sam: str, image_size: Optional[int] = None, word_length: int = 20,
                       threshold: float = 0.5, sam_image_size: Optional[int] = None,
                       **loading) -> "PromptRisProcessor":
        """The processor matching `PromptRisModel.from_backbones(clip=..., sam=...)`.

        Args:
            clip (`str` or `os.PathLike`): the CLIP checkpoint (its image processor and tokenizer).
            sam (`str` or `os.PathLike`): the SAM checkpoint (its image processor and input size).
            image_size (`int`, *optional*): CLIP's input side; defaults to 30 x the checkpoint's patch size, as the
                model's default (480 for ViT-B/16).
            word_length (`int`): tokens per expression, as the model config's `word_length`.
            threshold (`float`): default post-processing threshold.
            sam_image_size (`int`, *optional*): SAM's input side; defaults to the SAM checkpoint's (1024), as
                the model's `sam_image_size`.
            **loading: passed to the `from_pretrained` calls (`revision`, `cache_dir`, `token`, ...).
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        if image_size is None:
            image_size = PAPER_GRID * int(CLIPConfig.from_pretrained(clip, **loading).vision_config.patch_size)
        if sam_image_size is None:
            sam_image_size = int(SamConfig.from_pretrained(sam, **loading).vision_config.image_size)
        image_processor = AutoImageProcessor.from_pretrained(clip, **loading)
        image_processor.size = {"height": image_size, "width": image_size}
        image_processor.do_center_crop = False
        sam_image_processor = AutoImageProcessor.from_pretrained(sam, **loading)
        sam_image_processor.size = {"longest_edge": sam_image_size}
        sam_image_processor.pad_size = {"height": sam_image_size, "width": sam_image_size}
        tokenizer = AutoTokenizer.from_pretrained(clip, **loading)
        return cls(image_processor=image_processor, sam_image_processor=sam_image_processor, tokenizer=tokenizer,
                   image_size=image_size, sam_image_size=sam_image_size, word_length=word_length, threshold=threshold)

    def _clip_pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP's processing of one image, letterboxed: (3, image_size, image_size)."""
        height, width = resize_longest_side_shape(image.height, image.width, self.image_size)
        resized = self.image_processor(image, do_resize=True, size={"height": height, "width": width},
                                       do_center_crop=False, return_tensors="pt")["pixel_values"][0]
        padded = resized.new_zeros(3, self.image_size, self.image_size)
        padded[:, :height, :width] = resized
        return padded

    def _sam_pixels(self, images: list) -> torch.Tensor:
        """SAM's processing of images: (U, 3, sam_image_size, sam_image_size)."""
        resized = []
        for image in images:
            height, width = resize_longest_side_shape(image.height, image.width, self.sam_image_size)
            resized.append(image.resize((width, height), Image.BILINEAR))
        pad = {"height": self.sam_image_size, "width": self.sam_image_size}
        return self.sam_image_processor(resized, do_resize=False, do_pad=True, pad_size=pad,
                                        return_tensors="pt")["pixel_values"]

    def __call__(self, images=None, text=None, masks=None, **kwargs: Unpack[PromptRisProcessorKwargs]) -> BatchFeature:
        """Encode image-text pairs (and masks).

        Args:
            images: one image or a list (PIL of any mode, numpy, torch, paths); one image pairs with every
                expression, N images with N expressions or N lists of expressions.
            text (`str` or list): the referring expressions.
            masks (*optional*): one ground-truth mask per pair, each of its image's size.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            **kwargs: `PromptRisProcessorKwargs`: tokenizer arguments, flat or as `text_kwargs` (padding and length
                are fixed by `word_length`).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S), `sam_pixel_values` (B, 3, S_sam, S_sam), `input_ids` and
            `attention_mask` (B, word_length), `original_sizes` (B, 2) long (height, width), and `labels`
            (B, S_sam, S_sam) float 0/1 in SAM's padded frame when `masks` are given; S = `image_size`,
            S_sam = `sam_image_size`, B = number of pairs.
        """
        text_kwargs, return_tensors = self.tokenizer_kwargs(kwargs, word_length=self.word_length)
        inputs = self.prepare_referring_inputs(images, text, masks)
        first = {}
        for pair, index in enumerate(inputs.image_indices):
            first.setdefault(index, pair)
        distinct = [inputs.images[pair] for pair in first.values()]
        clip_pixels = torch.stack([self._clip_pixels(image) for image in distinct])
        sam_pixels = self._sam_pixels(distinct)
        rows = torch.tensor([list(first).index(i) for i in inputs.image_indices], dtype=torch.long)
        encoded = self.tokenizer(inputs.texts, return_tensors="pt", **text_kwargs)
        data = {
            "pixel_values": clip_pixels[rows],
            "sam_pixel_values": sam_pixels[rows],
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "original_sizes": inputs.original_sizes,
        }
        if inputs.masks is not None:
            data["labels"] = resize_masks_to_input(inputs.masks, self.sam_image_size, longest_side=True)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list:
        return ["pixel_values", "sam_pixel_values", "input_ids", "attention_mask"]


__all__ = ["PromptRisProcessor", "PromptRisProcessorKwargs"]
