"""Shared processor behaviour for every refseg method's `XxxProcessor(ProcessorMixin)`.

Free functions do the input checking and the geometry; `ReferringSegmentationProcessorMixin`
bundles them for processors:

- `load_image`: anything image-like -> RGB `PIL.Image` (any PIL mode, EXIF orientation applied,
  numpy / torch arrays, file paths).
- `validate_text`, `pair_images_and_texts`: one image with N expressions, N images with N
  expressions, or N images with N lists of expressions.
- `load_mask`, `validate_masks`, `resize_masks_to_input`: ground-truth masks -> `labels`.
- `post_process_masks`: logits -> boolean masks at the original sizes, undoing SAM-style
  resize-longest-side + pad when the model input was padded.

Imports only numpy, PIL and torch, so that exported (remote) model code can carry it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs

from .no_target import apply_no_target

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent images are composited on white (what a viewer shows);
    16-bit integer modes ("I;16*", and "I" as Pillow used to open 16-bit PNGs) are scaled by
    255/65535; "F" is taken as [0, 1] floats, like float arrays."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"`images`: cannot convert a PIL image of mode {mode!r} to RGB") from err


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ValueError(
                f"`images`: float arrays must hold values in [0, 1], got range "
                f"[{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]"
            )
        return np.rint(np.nan_to_num(array) * 255).astype(np.uint8)
    if array.dtype == np.uint16:
        return np.rint(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"`images`: integer arrays must hold values in [0, 255], got dtype {array.dtype}")
        return array.astype(np.uint8)
    raise ValueError(f"`images`: unsupported array dtype {array.dtype}")


def _array_to_pil(array: np.ndarray, channels_first: bool) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} -> RGB image.

    numpy arrays are read channels-last unless only the first axis can be channels; torch tensors
    (`channels_first=True`) the other way round."""
    if array.ndim == 3:
        last, first = array.shape[-1] in (1, 3, 4), array.shape[0] in (1, 3, 4)
        if (channels_first and first) or (not last and first):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(f"`images`: a 3-D array needs 1, 3 or 4 channels first or last, got shape {array.shape}")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"`images`: expected an array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    if min(array.shape[:2]) == 0:
        raise ValueError(f"`images`: empty image of shape {array.shape}")
    pixels = np.ascontiguousarray(_array_to_uint8(array))
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if pixels.shape[-1] == 4:
        return _pil_to_rgb(Image.fromarray(pixels, mode="RGBA"))
    return Image.fromarray(pixels, mode="RGB")


def load_image(image) -> Image.Image:
    """Return `image` as an RGB `PIL.Image.Image`.

    Accepts a PIL image of any mode (EXIF orientation applied; transparency composited on
    white), a numpy array ((H, W), (H, W, C) or (C, H, W), C in {1, 3, 4}; uint8, uint16, bool,
    or float in [0, 1]), a torch tensor (same layouts, read channels-first when ambiguous) or a
    path (`str` / `Path`) to an image file. Anything else raises `ValueError` naming `images`.
    """
    if isinstance(image, Image.Image):
        try:
            return _pil_to_rgb(image)
        except OSError as err:  # a lazily opened file that turns out truncated when decoded
            raise ValueError(f"`images`: cannot decode the PIL image ({err})") from err
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:  # PIL refuses a decompression bomb here, from the header alone
                opened.load()
                return _pil_to_rgb(opened)
        except Image.DecompressionBombError as err:
            raise ValueError(f"`images`: the image file {str(image)!r} is too large to decode ({err})") from err
        except (OSError, UnidentifiedImageError, SyntaxError, EOFError) as err:  # missing, truncated, not an image
            raise ValueError(f"`images`: cannot open an image file at {str(image)!r} ({err})") from err
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.layout != torch.strided or tensor.is_complex() or tensor.is_quantized:
            raise ValueError(f"`images`: unsupported tensor (layout {tensor.layout}, dtype {tensor.dtype})")
        if tensor.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            tensor = tensor.float()
        return _array_to_pil(tensor.numpy(), channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, channels_first=False)
    raise ValueError(
        f"`images` must be PIL images, numpy arrays, torch tensors or image paths; got {_describe(image)}"
    )


def validate_text(text) -> list[str]:
    """A `str` or a list/tuple of `str` -> list of expressions; empty or blank ones raise `ValueError`."""
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"`text` must be a non-empty string or a non-empty list of strings, got {_describe(text)}")
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(f"`text`[{index}] must be a string, got {_describe(item)}")
        if not item.strip():
            raise ValueError(f"`text`[{index}] is empty; every expression needs at least one word")
    return list(texts)


def pair_images_and_texts(images, texts) -> tuple[list[Image.Image], list[str], list[int]]:
    """Pair images with referring expressions, one pair per expression.

    - one image (or a one-element list) with N expressions: the image is paired with each;
    - N images with N expressions: one to one;
    - N images with N lists of expressions: each image with each of its expressions (flattened).

    Returns `(images, texts, image_indices)`: one loaded RGB image per expression (the same
    object repeated for expressions of one image), the flat expressions, and the index into the
    input images of each pair.
    """
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    if not image_list:
        raise ValueError("`images` is empty; pass at least one image")
    nested = isinstance(texts, (list, tuple)) and bool(texts) and all(isinstance(t, (list, tuple)) for t in texts)
    if nested:
        groups = [validate_text(list(group)) for group in texts]
    else:
        flat = validate_text(texts)
        groups = [flat] if len(image_list) == 1 else [[t] for t in flat]
    if len(groups) != len(image_list):
        num_texts = sum(len(g) for g in groups)
        raise ValueError(
            f"`images` and `text` do not pair: got {len(image_list)} images and {num_texts} texts"
            f"{f' in {len(groups)} lists' if nested else ''}; pass one image with any number of texts, "
            "N images with N texts, or N images with N lists of texts"
        )
    loaded = [load_image(image) for image in image_list]
    paired_images, paired_texts, indices = [], [], []
    for index, (image, group) in enumerate(zip(loaded, groups)):
        paired_images.extend([image] * len(group))
        paired_texts.extend(group)
        indices.extend([index] * len(group))
    return paired_images, paired_texts, indices


def load_mask(mask) -> np.ndarray:
    """A ground-truth mask -> bool array (h, w).

    PIL: foreground is any non-zero value (palette index for "P", any colour channel for
    RGB/RGBA/LA; EXIF orientation applied). numpy / torch: (h, w), (1, h, w) or (h, w, 1); bool
    as is, integers > 0, floats > 0.5.
    """
    if isinstance(mask, Image.Image):
        mask = ImageOps.exif_transpose(mask)
        values = np.asarray(mask.convert("RGBA"))[..., :3] if mask.mode in _ALPHA_MODES else np.asarray(mask)
        return (values > 0).any(axis=-1) if values.ndim == 3 else values > 0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"`masks` must be PIL images, numpy arrays or torch tensors, got {_describe(mask)}")
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask[0] if mask.shape[0] == 1 else mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"`masks`: expected a mask of shape (h, w), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.copy()
    if np.issubdtype(mask.dtype, np.floating):
        return mask > 0.5
    return mask > 0


def validate_masks(masks, images: Sequence[Image.Image]) -> list[np.ndarray]:
    """Load `masks` (one per image-text pair, nested lists flattened) and check them against `images`."""
    if not isinstance(masks, (list, tuple)):
        masks = [masks]
    if masks and all(isinstance(m, (list, tuple)) for m in masks):
        masks = [m for group in masks for m in group]
    if len(masks) != len(images):
        raise ValueError(f"`masks`: got {len(masks)} masks for {len(images)} image-text pairs; pass one mask per text")
    loaded = []
    for index, (mask, image) in enumerate(zip(masks, images)):
        array = load_mask(mask)
        if array.shape != (image.height, image.width):
            raise ValueError(
                f"`masks`[{index}] has size (h, w) = {array.shape} but its image has size "
                f"(h, w) = {(image.height, image.width)}"
            )
        loaded.append(array)
    return loaded


def get_original_sizes(images: Sequence[Image.Image]) -> torch.Tensor:
    """`(B, 2)` long tensor of (height, width) per image."""
    return torch.tensor([[image.height, image.width] for image in images], dtype=torch.long).reshape(-1, 2)


def resize_longest_side_shape(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """Size after SAM's resize: the longest side becomes `longest_side`, rounding half up (as
    `SamImageProcessor`), and never below one pixel (a 1 x 2048 image keeps a 1-pixel side, where SAM's
    own processor would round it to 0 and fail)."""
    scale = longest_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _as_size(size, name: str) -> tuple[int, int]:
    """`size` (an int or a (height, width) pair of positive ints) -> (height, width); else `ValueError`."""
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and v >= 1
        and float(v).is_integer() for v in pair
    ):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of positive ints, got {size!r:.80}")
    return int(pair[0]), int(pair[1])


def resize_masks_to_input(masks, size, *, longest_side: bool = False) -> torch.Tensor:
    """Resize masks (each (h, w), any sizes) with nearest neighbour to the model input.

    Args:
        masks: sequence of masks accepted by `load_mask`.
        size (`int` or `(H, W)`): model input size.
        longest_side (`bool`): SAM-style geometry: resize so the longest side is `max(H, W)`
            keeping the aspect ratio, then zero-pad bottom/right to `(H, W)`; else stretch.

    Returns:
        `torch.FloatTensor` of shape `(B, H, W)` with values 0/1.
    """
    height, width = _as_size(size, "size")
    out = torch.zeros(len(masks), height, width)
    for index, mask in enumerate(masks):
        array = torch.from_numpy(load_mask(mask).astype(np.float32))[None, None]
        target = resize_longest_side_shape(*array.shape[-2:], max(height, width)) if longest_side else (height, width)
        resized = F.interpolate(array, size=target, mode="nearest-exact")[0, 0]
        out[index, : target[0], : target[1]] = resized[:height, :width]
    return out


def _as_target_sizes(target_sizes, batch_size: int) -> list[tuple[int, int]]:
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if not isinstance(target_sizes, (list, tuple)) or len(target_sizes) != batch_size:
        count = len(target_sizes) if isinstance(target_sizes, (list, tuple)) else type(target_sizes).__name__
        raise ValueError(f"`target_sizes` must hold one (height, width) per mask ({batch_size}), got {count}")
    return [_as_size(size, "target_sizes") for size in target_sizes]


def post_process_masks(
    logits: torch.Tensor, target_sizes, *, threshold: float = 0.5, input_size=None, valid_sizes=None
) -> list[torch.Tensor]:
    """Mask logits -> boolean masks at the target (original) sizes.

    Args:
        logits (`torch.Tensor` of shape `(B, h, w)` or `(B, 1, h, w)`): foreground logits.
        target_sizes (`(B, 2)` tensor or list of `(height, width)`): output size per mask.
        threshold (`float`): a pixel is foreground where `sigmoid(logit) > threshold`.
        input_size (`int` or `(H, W)`, *optional*): the padded model input size; required with
            `valid_sizes`.
        valid_sizes (`(B, 2)` tensor or list, *optional*): un-padded (height, width) of each image
            inside the model input (SAM's `reshaped_input_sizes`). When given, logits are first
            upsampled (bilinear) to `input_size` and cropped to the valid region.

    Returns:
        list of `B` bool tensors of shape `(height, width)`: bilinear upsampling of the logits,
        then thresholding.
    """
    if not (isinstance(logits, torch.Tensor) and (logits.dim() == 3 or (logits.dim() == 4 and logits.shape[1] == 1))):
        raise ValueError(f"`logits` must be a tensor of shape (B, h, w) or (B, 1, h, w), got {_describe(logits)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1), got {threshold}")
    logits = logits.reshape(logits.shape[0], 1, *logits.shape[-2:]).float()
    sizes = _as_target_sizes(target_sizes, logits.shape[0])
    if valid_sizes is not None:
        if input_size is None:
            raise ValueError("`input_size` is required with `valid_sizes` (the padded model input size)")
        valid = _as_target_sizes(valid_sizes, logits.shape[0])
        logits = F.interpolate(logits, size=_as_size(input_size, "input_size"), mode="bilinear", align_corners=False)
    masks = []
    for index, size in enumerate(sizes):
        sample = logits[index : index + 1]
        if valid_sizes is not None:
            sample = sample[..., : valid[index][0], : valid[index][1]]
        sample = F.interpolate(sample, size=size, mode="bilinear", align_corners=False)
        masks.append(sample[0, 0].sigmoid() > threshold)
    return masks


@dataclass
class ReferringInputs:
    """Checked inputs of one processor call; `B` = number of image-text pairs."""

    images: list  # B RGB PIL images (repeated for expressions of one image)
    texts: list  # B expressions
    image_indices: list  # B indices into the caller's images
    masks: Optional[list]  # B bool arrays (h, w) at the original sizes, or None
    original_sizes: torch.Tensor  # (B, 2) long, (height, width)


def load_clip_parts(clip, image_size: int, **loading) -> tuple:
    """`(image_processor, tokenizer)` of a CLIP checkpoint, the image processor set to resize straight to
    `image_size` x `image_size` with no centre crop (saved with the processor, so the folder alone
    reproduces the resize). `loading`: `from_pretrained` arguments (`revision`, `cache_dir`, ...)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(clip, **loading)
    image_processor.size = {"height": image_size, "width": image_size}
    image_processor.do_center_crop = False
    return image_processor, AutoTokenizer.from_pretrained(clip, **loading)


# The defaults of every refseg processor call (a TypedDict does not inherit `_defaults`: each subclass sets it).
PROCESSOR_KWARGS_DEFAULTS = {"text_kwargs": {"padding": True, "truncation": True, "return_tensors": "pt"}}


class ReferringSegmentationProcessorKwargs(ProcessingKwargs, total=False):
    """Typed keyword arguments of a refseg processor call, as transformers' processors take them: the
    tokenizer's (`text_kwargs`, or flat: `max_length=...`) and `return_tensors` (default `"pt"`). A method's
    processor subclasses it (`RisclipProcessorKwargs`, ...), with `_defaults = PROCESSOR_KWARGS_DEFAULTS`."""

    _defaults = PROCESSOR_KWARGS_DEFAULTS


class ReferringSegmentationProcessorMixin:
    """Shared behaviour of refseg processors.

    Use as `class XxxProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin)`.

    Class-level hooks a processor sets:
        threshold (`float`): default binarisation threshold (set from the model config; 0.5).
        padded_input_size (`int`, *optional*): for SAM-style inputs (longest side resized to this
            and padded to a square), `post_process_referring_segmentation` crops the padding; the
            valid region is computed from `target_sizes`, so they must have the original images'
            aspect ratios (the processor output's `original_sizes` do).
    """

    threshold: float = 0.5
    padded_input_size: Optional[int] = None
    kwargs_class = ReferringSegmentationProcessorKwargs

    def tokenizer_kwargs(self, kwargs: dict, *, word_length: Optional[int] = None) -> tuple[dict, Optional[str]]:
        """`(tokenizer keyword arguments, return_tensors)` of one call: `kwargs` merged with
        `self.kwargs_class`'s defaults by transformers' `_merge_kwargs` (flat or per modality:
        `max_length=8` or `text_kwargs={"max_length": 8}`).

        `word_length`: every expression is padded and truncated to this many tokens, so `padding`,
        `truncation` and `max_length` are refused. Keyword arguments the typed kwargs do not know are a
        `ValueError` (transformers would warn and drop them)."""
        valid = {"text_kwargs"} | set(get_type_hints(self.kwargs_class)["text_kwargs"].__annotations__)
        given = set(kwargs) | set(kwargs.get("text_kwargs") or {})
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"unexpected arguments {unknown}; pass `images`, `text`, `masks`, `return_tensors` "
                             f"and tokenizer arguments (`text_kwargs`)")
        if word_length is not None:
            for name in ("padding", "truncation", "max_length"):
                if name in given:
                    raise ValueError(f"`{name}` is fixed by the processor's `word_length` ({word_length})")
        merged = self._merge_kwargs(self.kwargs_class, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = dict(merged["text_kwargs"])
        return_tensors = text_kwargs.pop("return_tensors", None)
        if word_length is not None:
            text_kwargs.update(padding="max_length", truncation=True, max_length=word_length)
        return text_kwargs, return_tensors

    def prepare_referring_inputs(self, images, text, masks=None) -> ReferringInputs:
        """Validate and pair `images` / `text` (/ `masks`) for a processor call."""
        if images is None:
            raise ValueError("`images` is required")
        if text is None:
            raise ValueError("`text` is required: one referring expression per mask to predict")
        paired_images, texts, indices = pair_images_and_texts(images, text)
        loaded_masks = None if masks is None else validate_masks(masks, paired_images)
        sizes = get_original_sizes(paired_images)
        # Nothing of the call is kept on the processor: one processor serves many threads at once
        # (a pipeline behind a web server), so the sizes travel in the output's `original_sizes`.
        return ReferringInputs(paired_images, texts, indices, loaded_masks, sizes)

    def encode_square_pairs(self, inputs: ReferringInputs, return_tensors=None, **tokenizer_kwargs):
        """`BatchFeature` of CLIP-style pairs: each distinct image resized to `self.image_size` squared and
        normalised once (rows repeat it for its expressions), the texts tokenised with `tokenizer_kwargs`.

        Keys: `pixel_values` (B, 3, S, S), `input_ids` / `attention_mask` (B, T), `original_sizes` (B, 2)
        (height, width), and `labels` (B, S, S) float 0/1 when `inputs.masks` is set.
        """
        first = {}
        for pair, index in enumerate(inputs.image_indices):
            first.setdefault(index, pair)
        unique = [inputs.images[pair] for pair in first.values()]
        pixel_values = self.image_processor(
            unique, do_resize=True, size={"height": self.image_size, "width": self.image_size},
            do_center_crop=False, return_tensors="pt",
        )["pixel_values"]
        rows = torch.tensor([list(first).index(i) for i in inputs.image_indices], dtype=torch.long)
        encoded = self.tokenizer(inputs.texts, return_tensors="pt", **tokenizer_kwargs)
        data = {
            "pixel_values": pixel_values[rows],
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "original_sizes": inputs.original_sizes,
        }
        if inputs.masks is not None:
            data["labels"] = resize_masks_to_input(inputs.masks, self.image_size)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_referring_segmentation(
        self,
        outputs,
        target_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
        threshold: Optional[float] = None,
        no_target_threshold: Optional[float] = None,
    ) -> list[torch.Tensor]:
        """Model outputs -> list of bool masks `(height, width)` at the original image sizes.

        Args:
            outputs: a `ReferringSegmentationOutput` (or anything with `.logits` / `["logits"]`)
                or the logits tensor `(B, h, w)` itself.
            target_sizes: `(B, 2)` (height, width) per mask: the processor output's `original_sizes`.
                Required: the processor keeps no state between calls (so it is safe to share between
                threads), hence no "sizes of the last call".
            threshold: defaults to `self.threshold`.
            no_target_threshold: for a model with the presence head (`config.no_target_head`, the output's
                `no_target_logits`): a mask comes back empty where `sigmoid(no_target_logits)` exceeds it. Pass the
                model config's `no_target_threshold` (the pipeline and `scripts/evaluate.py` do); defaults to
                `self.no_target_threshold` when the processor has one, else 0.5.
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
        if logits is None:
            raise ValueError(f"`outputs` must be a model output with `logits` or a tensor, got {_describe(outputs)}")
        if target_sizes is None:
            raise ValueError("`target_sizes` is required (pass the processor output's `original_sizes`)")
        threshold = self.threshold if threshold is None else threshold
        sizes = _as_target_sizes(target_sizes, logits.shape[0])
        valid_sizes = None
        if self.padded_input_size is not None:
            valid_sizes = [resize_longest_side_shape(h, w, self.padded_input_size) for h, w in sizes]
        masks = post_process_masks(
            logits, sizes, threshold=threshold, input_size=self.padded_input_size, valid_sizes=valid_sizes
        )
        return self.apply_presence(masks, outputs, no_target_threshold)

    def apply_presence(self, masks: list, outputs, no_target_threshold: Optional[float] = None) -> list:
        """`masks` with those emptied whose `sigmoid(outputs.no_target_logits)` exceeds `no_target_threshold`
        (default: `self.no_target_threshold` when set, else 0.5); unchanged for outputs without a presence head."""
        no_target_logits = getattr(outputs, "no_target_logits", None)
        if no_target_logits is None and isinstance(outputs, dict):
            no_target_logits = outputs.get("no_target_logits")
        if no_target_threshold is None:
            no_target_threshold = getattr(self, "no_target_threshold", 0.5)
        return apply_no_target(masks, no_target_logits, no_target_threshold)


__all__ = [
    "PROCESSOR_KWARGS_DEFAULTS",
    "ReferringInputs", "ReferringSegmentationProcessorKwargs", "ReferringSegmentationProcessorMixin",
    "get_original_sizes", "load_clip_parts", "load_image",
    "load_mask",
    "pair_images_and_texts", "post_process_masks", "resize_longest_side_shape", "resize_masks_to_input",
    "validate_masks", "validate_text",
]  # fmt: skip
