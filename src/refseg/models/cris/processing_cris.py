"""CRIS processor: CLIP tokenizer padded/truncated to the word length + CLIP image processor at the model size."""

from typing import Optional

from transformers import CLIPConfig, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from ...processing_utils import ReferringSegmentationProcessorMixin, load_clip_parts
from .configuration_cris import MIN_WORD_LENGTH, PAPER_GRID


class CrisProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    r"""
    Prepares images, referring expressions and (optionally) masks for [`CrisModel`].

    Images are resized straight to `image_size` x `image_size` (no centre crop; CLIP's bicubic resampling,
    mean and std). Expressions are tokenised with CLIP's tokenizer and padded / truncated to exactly
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

    Example:

    ```python
    >>> processor = CrisProcessor.from_backbones(clip="openai/clip-vit-base-patch16")  # 416 px, 17 tokens
    >>> inputs = processor(images=image, text=["the red circle", "the square on the left"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    # model config fields the training script passes to `from_backbones` (refseg.training.modeling)
    config_fields = ("word_length", "threshold")

    def __init__(self, image_processor=None, tokenizer=None, image_size: int = 416, word_length: int = 17,
                 threshold: float = 0.35):
        super().__init__(image_processor, tokenizer)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if not isinstance(word_length, int) or word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be an int of at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {word_length!r}"
            )
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
        self.image_size = image_size
        self.word_length = word_length
        self.threshold = threshold

    @classmethod
    def from_backbones(cls, clip: str, image_size: Optional[int] = None, word_length: int = 17,
                       threshold: float = 0.35, **loading) -> "CrisProcessor":
        """The processor matching `CrisModel.from_backbones(clip=...)`.

        Args:
            clip (`str` or `os.PathLike`): the CLIP checkpoint (Hub id or folder) the model is built on.
            image_size (`int`, *optional*): defaults to 26 x the checkpoint's patch size, as the model's default
                (416 for ViT-B/16).
            word_length (`int`): tokens per expression, as the model config's `word_length`.
            threshold (`float`): default post-processing threshold.
            **loading: passed to the `from_pretrained` calls (`revision`, `cache_dir`, `token`, ...).
        """
        if image_size is None:
            image_size = PAPER_GRID * int(CLIPConfig.from_pretrained(clip, **loading).vision_config.patch_size)
        image_processor, tokenizer = load_clip_parts(clip, image_size, **loading)
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size,
                   word_length=word_length, threshold=threshold)

    def __call__(self, images=None, text=None, masks=None, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Encode image-text pairs (and masks).

        Args:
            images: one image or a list (PIL of any mode, numpy, torch, paths); one image pairs with every
                expression, N images with N expressions or N lists of expressions.
            text (`str` or list): the referring expressions.
            masks (*optional*): one ground-truth mask per pair, each of its image's size.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            **kwargs: passed to the tokenizer (padding and length are fixed by `word_length`).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S), `input_ids` and `attention_mask` (B, word_length),
            `original_sizes` (B, 2) long (height, width), and `labels` (B, S, S) float 0/1 when `masks` are
            given; S = `image_size`, B = number of pairs.
        """
        inputs = self.prepare_referring_inputs(images, text, masks)
        for name in ("padding", "truncation", "max_length"):
            if name in kwargs:
                raise ValueError(f"`{name}` is fixed by the processor's `word_length` ({self.word_length})")
        return self.encode_square_pairs(inputs, return_tensors, padding="max_length", truncation=True,
                                        max_length=self.word_length, **kwargs)

    @property
    def model_input_names(self) -> list:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["CrisProcessor"]
