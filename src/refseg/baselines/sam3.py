"""Stock SAM3 (`Sam3Model`, `Sam3Processor`) as a zero-shot referring segmentation baseline.

SAM3 answers a text prompt with up to `num_queries` instances: per instance a mask (logits at a
quarter of the input size, 288 x 288 for `facebook/sam3` at 1008 px) and a score logit, plus one
presence logit per prompt ("is the concept in the image at all"). A referring expression names one
object, so the expression is the prompt and one mask is chosen from the instances:

- `referring_selection="best"` (default): the instance with the highest presence x instance score,
  `sigmoid(presence_logit) * sigmoid(instance_logit)` (the score SAM3's own post-processing ranks by).
- `referring_selection="union"`: the union of the instances whose score is above `instance_threshold`
  (default 0.3, SAM3's own default for keeping instances); the best instance is always included, so
  the union is never empty by construction. As logits: the pixel-wise maximum over those instances'
  mask logits (`sigmoid(max) > t` exactly where some chosen instance has `sigmoid > t`).

Both are read from the model config (`model.config.referring_selection = "union"`), with the defaults
above when a Hub config does not carry them. Nothing of SAM3's code is copied: `Sam3ReferringModel`
subclasses `Sam3Model` (same weights) and calls its `get_vision_features` and `forward`.

**No target (generalized referring segmentation).** SAM3's presence logit is mapped onto refseg's
presence output: `no_target_logits = -presence_logit` (B,), so `sigmoid(no_target_logits) = 1 -
sigmoid(presence)` is the probability that the expression has no referent, exactly as for a refseg
method with `config.no_target_head=True` (`refseg.no_target`). Post-processing then returns an empty mask
where it exceeds `no_target_threshold` (0.5 unless the config carries one), and the pipeline reports
`score = sigmoid(presence)` and `no_target`. This is **on by default** (`config.no_target_head`, read
with default `True`): the presence token is part of stock SAM3, trained by its authors to answer "is the
concept in the image at all", and SAM3's own post-processing keeps no instance when it says no, so
always returning a mask would be the departure from SAM3. The price: on datasets where every expression
has a referent (RefCOCO), a presence miss now costs SAM3 the whole mask. Set
`model.config.no_target_head = False` for the previous behaviour (always the chosen instance's mask, no
`no_target_logits`).

**One image, several expressions.** The forward encodes each distinct image of the batch once
(`get_vision_features` on the distinct rows of `pixel_values`) and passes the cached features to the
stock forward as `vision_embeds`, one row per expression.

`Sam3ReferringProcessor` wraps a stock `Sam3Processor`: its image processor (a plain resize to its
square `size`, 1008 px) and its tokenizer (padded to 32 tokens, as `Sam3Processor` does); the masks
are upsampled bilinearly to the original sizes and thresholded at 0.5 (SAM3's `mask_threshold`).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Sam3Model, Sam3Processor
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from ..modeling_outputs import ReferringSegmentationOutput
from ..modeling_utils import unique_rows
from ..processing_utils import resize_masks_to_input
from .wrapping import StockProcessorWrapper

SELECTIONS = ("best", "union")
DEFAULT_INSTANCE_THRESHOLD = 0.3
DEFAULT_NO_TARGET_HEAD = True  # presence -> `no_target_logits` unless the config says `no_target_head=False`
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to 32 tokens


def select_referring_mask(mask_logits: torch.Tensor, scores: torch.Tensor, *, selection: str = "best",
                          instance_threshold: float = DEFAULT_INSTANCE_THRESHOLD) -> torch.Tensor:
    """One mask per prompt from SAM3's instances (module docstring).

    Args:
        mask_logits (`torch.Tensor` of shape `(B, Q, h, w)`): instance mask logits.
        scores (`torch.Tensor` of shape `(B, Q)`): presence x instance scores in [0, 1].
        selection (`str`): `"best"` or `"union"`.
        instance_threshold (`float`): `"union"` keeps instances scoring above it (and always the best one).

    Returns:
        `torch.Tensor` of shape `(B, h, w)`: the chosen mask logits.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"`selection` must be one of {SELECTIONS}, got {selection!r}")
    if mask_logits.dim() != 4 or scores.shape != mask_logits.shape[:2]:
        raise ValueError(f"`mask_logits` (B, Q, h, w) and `scores` (B, Q) do not fit: {tuple(mask_logits.shape)}, "
                         f"{tuple(scores.shape)}")
    best = scores.argmax(dim=1)  # (B,)
    chosen = mask_logits[torch.arange(len(best), device=best.device), best]  # (B, h, w)
    if selection == "best":
        return chosen
    keep = scores > instance_threshold  # (B, Q)
    masked = mask_logits.masked_fill(~keep[:, :, None, None], float("-inf")).amax(dim=1)  # -inf where none kept
    return torch.maximum(chosen, masked)


class Sam3ReferringModel(Sam3Model):
    """`Sam3Model` answering one expression per row with one mask (module docstring)."""

    def adapt_processor(self, processor) -> "Sam3ReferringProcessor":
        """The stock `Sam3Processor` (as `AutoProcessor` loads it) wrapped in refseg's processor contract."""
        if isinstance(processor, Sam3ReferringProcessor):
            return processor
        return Sam3ReferringProcessor(processor, threshold=getattr(self.config, "threshold", None))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, **kwargs) -> ReferringSegmentationOutput:
        """SAM3 with each row's expression as the text prompt, one mask chosen per row.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): one image per expression (repeated rows
                are encoded once).
            input_ids, attention_mask (`torch.LongTensor` of shape `(B, T)`): the expressions.

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, h, w), the chosen instance mask logits (h = S / 4 for
            the released model's mask decoder), and, unless `config.no_target_head` is `False`,
            `no_target_logits` (B,) = `-presence_logits` (module docstring).
        """
        if kwargs.pop("labels", None) is not None:
            raise ValueError("`labels`: the SAM3 baseline is zero-shot; refseg does not train it")
        # 1. the vision encoder once per distinct image, its features repeated for each expression
        representatives, inverse = unique_rows(pixel_values)
        vision = self.get_vision_features(pixel_values=pixel_values[representatives])
        vision = Sam3VisionEncoderOutput(
            last_hidden_state=vision.last_hidden_state[inverse],
            fpn_hidden_states=tuple(f[inverse] for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p[inverse] for p in vision.fpn_position_encoding),
        )
        # 2. the stock detector on the cached features
        outputs = super().forward(vision_embeds=vision, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # 3. one instance (or the union of several) per expression
        scores = outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid()  # (B, Q) x (B, 1)
        logits = select_referring_mask(
            outputs.pred_masks, scores, selection=getattr(self.config, "referring_selection", "best"),
            instance_threshold=getattr(self.config, "instance_threshold", DEFAULT_INSTANCE_THRESHOLD))
        # 4. presence -> no target: sigmoid(-p) = 1 - sigmoid(p), the probability that nothing is referred to
        no_target_logits = None
        if getattr(self.config, "no_target_head", DEFAULT_NO_TARGET_HEAD):
            no_target_logits = -outputs.presence_logits.squeeze(-1)  # (B, 1) -> (B,)
        return ReferringSegmentationOutput(logits=logits, no_target_logits=no_target_logits)


class Sam3ReferringProcessor(StockProcessorWrapper):
    """A stock `Sam3Processor` with refseg's processor contract (module docstring).

    Args:
        processor (`Sam3Processor`): the stock processor (its `image_processor` and `tokenizer` are used).
        threshold (`float`, *optional*): mask threshold on the sigmoid (0.5, SAM3's `mask_threshold`, when `None`).
    """

    stock_processor_name = "Sam3Processor"

    def __init__(self, processor, *, threshold: Optional[float] = None):
        super().__init__(processor, threshold=threshold, default_threshold=0.5)

    @classmethod
    def from_pretrained(cls, name_or_path, *, threshold=None, **kwargs):
        """Wrap `Sam3Processor.from_pretrained(name_or_path, **kwargs)`."""
        return cls(Sam3Processor.from_pretrained(name_or_path, **kwargs), threshold=threshold)

    def save_pretrained(self, save_directory, **kwargs):
        return self.processor.save_pretrained(save_directory, **kwargs)

    def __call__(self, images=None, text=None, masks=None, return_tensors="pt", **kwargs):
        """`BatchFeature` with `pixel_values` (B, 3, S, S) (each distinct image processed once), `input_ids` /
        `attention_mask` (B, 32), `original_sizes` (B, 2) and, with `masks`, `labels` (B, S, S)."""
        from transformers.feature_extraction_utils import BatchFeature

        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}; pass `images`, `text`, `masks`, `return_tensors`")
        inputs = self.prepare_referring_inputs(images, text, masks)
        first = {}
        for pair, index in enumerate(inputs.image_indices):
            first.setdefault(index, pair)
        unique = [inputs.images[pair] for pair in first.values()]
        pixel_values = self.image_processor(unique, return_tensors="pt")["pixel_values"]
        rows = torch.tensor([list(first).index(i) for i in inputs.image_indices], dtype=torch.long)
        encoded = self.tokenizer(inputs.texts, padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=min(TEXT_LENGTH, self.tokenizer.model_max_length))
        data = {"pixel_values": pixel_values[rows], "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"], "original_sizes": inputs.original_sizes}
        if inputs.masks is not None:
            data["labels"] = resize_masks_to_input(inputs.masks, tuple(pixel_values.shape[-2:]))
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["DEFAULT_INSTANCE_THRESHOLD", "DEFAULT_NO_TARGET_HEAD", "SELECTIONS", "Sam3ReferringModel",
           "Sam3ReferringProcessor", "select_referring_mask"]
