"""CRIS processor: CLIP tokenizer padded/truncated to the word length + CLIP image processor at the model size
(stretched, or letterboxed as the authors' code)."""

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import Unpack

from ...processing_utils import (
    PROCESSOR_KWARGS_DEFAULTS,
    ReferringSegmentationProcessorKwargs,
    ReferringSegmentationProcessorMixin,
    _as_target_sizes,
    load_clip_parts,
    load_mask,
)
from .configuration_cris import MASK_RESAMPLES, MIN_WORD_LENGTH, PAPER_GRID, RESIZE_MODES


def letterbox_geometry(height: int, width: int, size: int) -> tuple:
    """Where an image of `height` x `width` lands in the `size` x `size` letterbox (the authors' preprocessing:
    the aspect ratio kept, the longer side filling the square, centred): `(new_height, new_width, top, left)`.

    The authors place it with a sub-pixel affine warp; here the resized size is rounded to whole pixels and the
    offset is `(size - new) // 2`."""
    scale = min(size / height, size / width)
    new_height = min(size, max(1, int(round(height * scale))))
    new_width = min(size, max(1, int(round(width * scale))))
    return new_height, new_width, (size - new_height) // 2, (size - new_width) // 2


def resize_mask(mask: np.ndarray, size: tuple, resample: str) -> torch.Tensor:
    """One mask (h, w) -> float (H, W): nearest-exact (0/1) or bilinear (soft edges, as the authors' warp of the
    mask with linear interpolation)."""
    array = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    if resample == "bilinear":
        return F.interpolate(array, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    return F.interpolate(array, size=size, mode="nearest-exact")[0, 0]


class CrisProcessorKwargs(ReferringSegmentationProcessorKwargs, total=False):
    """Typed keyword arguments of `CrisProcessor.__call__`: tokenizer arguments and `return_tensors` (every
    expression padded and truncated to the processor's `word_length`)."""

    _defaults = PROCESSOR_KWARGS_DEFAULTS


class CrisProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    r"""
    Prepares images, referring expressions and (optionally) masks for [`CrisModel`].

    Images are resized straight to `image_size` x `image_size` (no centre crop; CLIP's bicubic resampling,
    mean and std), or, with `resize_mode="letterbox"` (the authors' code), resized with their aspect ratio kept
    so the longer side fills the square, centred, the rest filled with CLIP's mean colour (0 after
    normalisation); `post_process_referring_segmentation` then maps the probabilities back through the inverse
    of that placement (`map_to_original`). Expressions are tokenised with CLIP's tokenizer and padded / truncated to exactly
    `word_length` tokens, [SOS] and [EOS] included (truncation keeps the [EOS]); `attention_mask` marks the
    padding the decoder masks. One image with N expressions becomes N rows of `pixel_values` (the image is
    resized and normalised once and repeated); `CrisModel` recognises the repeated rows and runs its image
    tower once per image.

    Args:
        image_processor (`CLIPImageProcessor`): CLIP's image processor (its mean/std are used).
        tokenizer (`CLIPTokenizer`): CLIP's tokenizer.
        image_size (`int`, *optional*, defaults to 416): side of the square model input; must equal the
            model's `config.image_size`.
        word_length (`int`, *optional*, defaults to 17): tokens per expression (17 for RefCOCO/+, 22 for
            RefCOCOg); the model config's `word_length`. At least 3.
        threshold (`float`, *optional*, defaults to 0.35): default threshold of
            `post_process_referring_segmentation` (the paper's; the model config's `threshold`).
        resize_mode (`str`, *optional*, defaults to `"stretch"`): `"stretch"` or `"letterbox"` (the model
            config's `resize_mode`).
        mask_resample (`str`, *optional*, defaults to `"nearest"`): how masks become `labels`: `"nearest"`
            (0/1) or `"bilinear"` (soft edges, the authors' loss targets; the model config's `mask_resample`).

    Example:

    ```python
    >>> processor = CrisProcessor.from_backbones(clip="openai/clip-vit-base-patch16")  # 416 px, 17 tokens
    >>> inputs = processor(images=image, text=["the red circle", "the square on the left"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    kwargs_class = CrisProcessorKwargs
    # model config fields the training script passes to `from_backbones` (refseg.training.modeling)
    config_fields = ("word_length", "threshold", "resize_mode", "mask_resample")

    def __init__(self, image_processor=None, tokenizer=None, image_size: int = 416, word_length: int = 17,
                 threshold: float = 0.35, resize_mode: str = "stretch", mask_resample: str = "nearest"):
        super().__init__(image_processor, tokenizer)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if not isinstance(word_length, int) or word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be an int of at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {word_length!r}"
            )
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if mask_resample not in MASK_RESAMPLES:
            raise ValueError(f"`mask_resample` must be one of {MASK_RESAMPLES}, got {mask_resample!r}")
        self.image_size = image_size
        self.word_length = word_length
        self.threshold = threshold
        self.resize_mode = resize_mode
        self.mask_resample = mask_resample

    @classmethod
    def from_backbones(cls, clip: str, image_size: Optional[int] = None, word_length: int = 17,
                       threshold: float = 0.35, resize_mode: str = "stretch", mask_resample: str = "nearest",
                       **loading) -> "CrisProcessor":
        """The processor matching `CrisModel.from_backbones(clip=...)`.

        Args:
            clip (`str` or `os.PathLike`): the CLIP checkpoint (Hub id or folder) the model is built on.
            image_size (`int`, *optional*): defaults to 26 x the checkpoint's patch size, as the model's default
                (416 for ViT-B/16).
            word_length (`int`): tokens per expression, as the model config's `word_length`.
            threshold (`float`): default post-processing threshold.
            resize_mode (`str`): `"stretch"` or `"letterbox"`.
            mask_resample (`str`): `"nearest"` or `"bilinear"` (soft loss targets).
            **loading: passed to the `from_pretrained` calls (`revision`, `cache_dir`, `token`, ...).
        """
        if image_size is None:
            image_size = PAPER_GRID * int(CLIPConfig.from_pretrained(clip, **loading).vision_config.patch_size)
        image_processor, tokenizer = load_clip_parts(clip, image_size, **loading)
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size,
                   word_length=word_length, threshold=threshold, resize_mode=resize_mode,
                   mask_resample=mask_resample)

    def __call__(self, images=None, text=None, masks=None, **kwargs: Unpack[CrisProcessorKwargs]) -> BatchFeature:
        """Encode image-text pairs (and masks).

        Args:
            images: one image or a list (PIL of any mode, numpy, torch, paths); one image pairs with every
                expression, N images with N expressions or N lists of expressions.
            text (`str` or list): the referring expressions.
            masks (*optional*): one ground-truth mask per pair, each of its image's size.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            **kwargs: `CrisProcessorKwargs`: tokenizer arguments, flat or as `text_kwargs` (padding and length
                are fixed by `word_length`).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S), `input_ids` and `attention_mask` (B, word_length),
            `original_sizes` (B, 2) long (height, width), and `labels` (B, S, S) float when `masks` are
            given (0/1, or soft at the edges with `mask_resample="bilinear"`); S = `image_size`, B = number of
            pairs.
        """
        text_kwargs, return_tensors = self.tokenizer_kwargs(kwargs, word_length=self.word_length)
        inputs = self.prepare_referring_inputs(images, text, masks)
        if self.resize_mode == "stretch" and (inputs.masks is None or self.mask_resample == "nearest"):
            return self.encode_square_pairs(inputs, return_tensors, **text_kwargs)
        if self.resize_mode == "stretch":
            encoded = dict(self.encode_square_pairs(inputs, None, **text_kwargs))
            encoded["labels"] = torch.stack([resize_mask(m, (self.image_size,) * 2, "bilinear") for m in inputs.masks])
            return BatchFeature(data=encoded, tensor_type=return_tensors)
        return self._encode_letterboxed(inputs, return_tensors, **text_kwargs)

    def _encode_letterboxed(self, inputs, return_tensors, **text_kwargs) -> BatchFeature:
        """As `encode_square_pairs`, each distinct image letterboxed once (rows repeat it for its expressions)."""
        size, first = self.image_size, {}
        for pair, index in enumerate(inputs.image_indices):
            first.setdefault(index, pair)
        canvases = []
        for pair in first.values():
            image = inputs.images[pair]
            new_height, new_width, top, left = letterbox_geometry(image.height, image.width, size)
            resized = self.image_processor([image], do_resize=True, size={"height": new_height, "width": new_width},
                                           do_center_crop=False, return_tensors="pt")["pixel_values"][0]
            canvas = torch.zeros(3, size, size, dtype=resized.dtype)  # CLIP's mean colour, normalised
            canvas[:, top:top + new_height, left:left + new_width] = resized
            canvases.append(canvas)
        rows = torch.tensor([list(first).index(i) for i in inputs.image_indices], dtype=torch.long)
        encoded = self.tokenizer(inputs.texts, return_tensors="pt", **text_kwargs)
        data = {"pixel_values": torch.stack(canvases)[rows], "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"], "original_sizes": inputs.original_sizes}
        if inputs.masks is not None:
            labels = torch.zeros(len(inputs.masks), size, size)
            for row, mask in enumerate(inputs.masks):
                mask = load_mask(mask)
                new_height, new_width, top, left = letterbox_geometry(*mask.shape, size)
                labels[row, top:top + new_height, left:left + new_width] = resize_mask(
                    mask, (new_height, new_width), self.mask_resample)
            data["labels"] = labels
        return BatchFeature(data=data, tensor_type=return_tensors)

    def map_to_original(self, maps: torch.Tensor, target_sizes) -> list:
        """Maps at the model's output resolution (B, h, w) (probabilities, or logits) -> list of float maps
        (height, width) at the original image sizes: bilinear to the model input, then, for a letterboxed
        input, the inverse of the placement (the image's region cropped) and bilinear to the original size."""
        maps = maps.reshape(maps.shape[0], 1, *maps.shape[-2:]).float()
        sizes = _as_target_sizes(target_sizes, maps.shape[0])
        size = self.image_size
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        out = []
        for index, (height, width) in enumerate(sizes):
            sample = maps[index:index + 1]
            if self.resize_mode == "letterbox":
                new_height, new_width, top, left = letterbox_geometry(height, width, size)
                sample = sample[..., top:top + new_height, left:left + new_width]
            out.append(F.interpolate(sample, size=(height, width), mode="bilinear", align_corners=False)[0, 0])
        return out

    def post_process_referring_segmentation(self, outputs, target_sizes=None, threshold: Optional[float] = None,
                                            no_target_threshold: Optional[float] = None):
        """Model outputs -> list of bool masks `(height, width)` at the original image sizes.

        Stretched inputs: as every refseg processor (logits upsampled bilinearly, `sigmoid > threshold`).
        Letterboxed inputs: as the authors' code, the probabilities `sigmoid(logits)` are mapped back through
        the inverse of the letterbox (`map_to_original`) and thresholded. With the presence head, a mask is empty
        where `sigmoid(no_target_logits)` exceeds `no_target_threshold` (as in every refseg processor).
        """
        if self.resize_mode == "stretch":
            return super().post_process_referring_segmentation(outputs, target_sizes, threshold, no_target_threshold)
        logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
        if not isinstance(logits, torch.Tensor) or logits.dim() not in (3, 4):
            raise ValueError("`outputs` must be a model output with `logits` (B, h, w) or that tensor")
        if target_sizes is None:
            raise ValueError("`target_sizes` is required (pass the processor output's `original_sizes`)")
        threshold = self.threshold if threshold is None else threshold
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold}")
        masks = [probabilities > threshold for probabilities in self.map_to_original(logits.sigmoid(), target_sizes)]
        return self.apply_presence(masks, outputs, no_target_threshold)

    @property
    def model_input_names(self) -> list:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["CrisProcessor", "CrisProcessorKwargs", "letterbox_geometry", "resize_mask"]
