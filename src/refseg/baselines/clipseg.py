"""Stock CLIPSeg (`CLIPSegForImageSegmentation`, `CLIPSegProcessor`) behind refseg's contract.

CLIPSeg (Lüddecke and Ecker, CVPR 2022) is a frozen CLIP ViT with a small FiLM-conditioned
transformer decoder on three of its layers; transformers ships it with real weights
(`CIDAS/clipseg-rd64-refined`). Nothing of its code is copied here:

- `ClipsegReferringModel` subclasses `CLIPSegForImageSegmentation` (same modules, same weight names,
  so Hub checkpoints load as they are). Its `forward(pixel_values, input_ids, attention_mask,
  labels=None)` calls the stock forward and returns a `ReferringSegmentationOutput` whose `logits`
  (B, S, S) are the stock logits at the input size; `loss` is the stock BCE when `labels` (B, S, S)
  are given. It adds what refseg's training needs: `from_backbones(clip=...)` (a fresh decoder on a
  pretrained `CLIPModel`), one training stage `"default"` in which only the decoder trains (CLIP is
  frozen, as CLIPSeg itself keeps it under `torch.no_grad()`), and the decoder as the checkpointed
  weights (`trainable_state_dict`).
- `ClipsegReferringProcessor` wraps a stock `CLIPSegProcessor`: `processor(images=, text=,
  masks=None)` resizes every image straight to S x S (no centre crop, so the resize is undone
  exactly), tokenises the expressions (padded, truncated to CLIP's text length) and returns
  `original_sizes` (and `labels` for masks); `post_process_referring_segmentation` upsamples the
  logits bilinearly to each original size and keeps `sigmoid > threshold`.

**Threshold.** Default `DEFAULT_THRESHOLD = 0.5`, or `config.threshold` when the model config has one.
CLIPSeg is trained with per-pixel binary cross-entropy, so its sigmoid is a per-pixel foreground
probability and 0.5 is the decision that minimises the expected pixel error; the CLIPSeg paper's own
benchmarks tune a threshold per dataset instead, so pass `threshold=` (pipeline, evaluation
`--threshold`) to use another.

**One image, several expressions.** CLIPSeg's forward runs the vision tower on every row of
`pixel_values`; the stock model has no way to take cached image features, so an image paired with
N expressions is encoded N times.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import CLIPModel, CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor

from ..adapters.io import adapter_state_dict, load_adapter_state_dict
from ..modeling_outputs import ReferringSegmentationOutput
from ..modeling_utils import PROCESSOR_ONLY_INPUTS, check_required_inputs, is_exporting
from ..processing_utils import load_clip_parts
from .wrapping import StockProcessorWrapper

DEFAULT_THRESHOLD = 0.5
TRAINING_STAGES = ("default",)


class ClipsegReferringModel(CLIPSegForImageSegmentation):
    """`CLIPSegForImageSegmentation` with refseg's forward output and training hooks (module docstring).

    Config: a stock `CLIPSegConfig`; `from_backbones` also records `image_size` (the square input size
    S) and `threshold` in it when given, so a trained folder carries them.
    """

    modules_to_save = ("decoder",)
    training_stages = TRAINING_STAGES

    def __init__(self, config: CLIPSegConfig):
        super().__init__(config)
        self.set_training_stage("default")

    @classmethod
    def from_backbones(cls, clip, **overrides) -> "ClipsegReferringModel":
        """A CLIPSeg whose CLIP is `CLIPModel.from_pretrained(clip)` and whose decoder is freshly initialised.

        Args:
            clip (`str` or `os.PathLike`): a `CLIPModel` checkpoint (Hub id or folder).
            **overrides: `CLIPSegConfig` fields (`extract_layers`, `reduce_dim`, `decoder_intermediate_size`,
                ...) plus `image_size` (S, default CLIP's own) and `threshold`.

        Raises:
            ValueError: when the CLIP weights do not all find their place in CLIPSeg's CLIP (or some of
                CLIPSeg's CLIP stays unloaded).
        """
        clip_model = CLIPModel.from_pretrained(clip)
        clip_config = clip_model.config
        overrides.setdefault("image_size", clip_config.vision_config.image_size)
        config = CLIPSegConfig(text_config=clip_config.text_config.to_dict(),
                               vision_config=clip_config.vision_config.to_dict(),
                               projection_dim=clip_config.projection_dim, **overrides)
        model = cls(config)
        result = model.clip.load_state_dict(clip_model.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"`clip` {clip!r} does not fit CLIPSeg's CLIP: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        return model

    def set_training_stage(self, stage: str) -> None:
        """The decoder trains; CLIP (both towers and projections) stays frozen. Records the stage in the config."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.config.training_stage = stage
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)

    def trainable_state_dict(self) -> dict:
        """The decoder's parameters and buffers (what a training checkpoint keeps); keys as in `state_dict()`."""
        return adapter_state_dict(self, self.modules_to_save)

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load what `trainable_state_dict` returned; `ValueError` on missing or unexpected keys or shapes."""
        load_adapter_state_dict(self, state, self.modules_to_save)

    def adapt_processor(self, processor) -> "ClipsegReferringProcessor":
        """The stock `processor` (as `AutoProcessor` loads it) wrapped in refseg's processor contract."""
        if isinstance(processor, ClipsegReferringProcessor):
            return processor
        return ClipsegReferringProcessor(processor, image_size=getattr(self.config, "image_size", None),
                                         threshold=getattr(self.config, "threshold", None))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> ReferringSegmentationOutput:
        """Stock CLIPSeg on (image, expression) pairs.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): the images, one per expression.
            input_ids, attention_mask (`torch.LongTensor` of shape `(B, T)`): the expressions.
            labels (`torch.FloatTensor` of shape `(B, S, S)`, *optional*): 0/1 target masks.
            output_hidden_states, output_attentions, return_dict: as in transformers; the stock CLIP image
                tower's hidden states and attentions come back as `vision_*` (stock CLIPSeg returns none of its
                text tower's).
            original_sizes: the processor's, accepted and ignored (post-processing reads them).

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, S, S), `text_embeds` (B, projection_dim) (the FiLM
            conditioning), and `loss` / `loss_dict` (`{"bce": ...}`) with `labels`.
        """
        # inputs neither the processor nor the stock forward knows are an error, as for refseg's models
        check_required_inputs(pixel_values, input_ids, {k: v for k, v in kwargs.items() if k not in _STOCK_INPUTS})
        for name in PROCESSOR_ONLY_INPUTS:
            kwargs.pop(name, None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if labels is not None:
            labels = labels.to(pixel_values.dtype)
        if is_exporting() and "conditional_embeddings" not in kwargs:
            # the stock text path checks `len(input_ids)`, which fixes the batch of an exported graph: the same
            # text features, handed in
            with torch.no_grad():
                kwargs["conditional_embeddings"] = self.clip.get_text_features(
                    input_ids, attention_mask=attention_mask).pooler_output
            input_ids = attention_mask = None
        outputs = super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                  labels=labels, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, return_dict=True, **kwargs)
        logits = outputs.logits
        if logits.dim() == 2:  # the decoder squeezes its channel axis only, but stay safe for B == 1
            logits = logits.unsqueeze(0)
        loss_dict = None if outputs.loss is None else {"bce": outputs.loss.detach()}
        vision = outputs.vision_model_output  # the stock model returns no text-tower outputs
        result = ReferringSegmentationOutput(
            loss=outputs.loss, logits=logits, text_embeds=outputs.conditional_embeddings, loss_dict=loss_dict,
            # CLIPSeg always asks its image tower for the decoder's layers: returned only when asked for
            vision_hidden_states=vision.hidden_states if output_hidden_states else None,
            vision_attentions=vision.attentions,
        )
        return result if return_dict else result.to_tuple()


# keyword inputs of the stock `CLIPSegForImageSegmentation.forward` (`conditional_embeddings`, ...)
_STOCK_INPUTS = frozenset(inspect.signature(CLIPSegForImageSegmentation.forward).parameters) - {"self", "kwargs"}


class ClipsegReferringProcessor(StockProcessorWrapper):
    """A stock `CLIPSegProcessor` with refseg's processor contract (module docstring).

    Args:
        processor (`CLIPSegProcessor`): the stock processor (its `image_processor` and `tokenizer` are used).
        image_size (`int`, *optional*): square input size S; default the image processor's `size` (352 for
            `CIDAS/clipseg-rd64-refined`).
        threshold (`float`, *optional*): default mask threshold (`DEFAULT_THRESHOLD` when `None`).
    """

    stock_processor_name = "CLIPSegProcessor"

    def __init__(self, processor, *, image_size: Optional[int] = None, threshold: Optional[float] = None):
        super().__init__(processor, threshold=threshold, default_threshold=DEFAULT_THRESHOLD)
        self.image_size = int(image_size or _square_size(self.image_processor))

    @classmethod
    def from_pretrained(cls, name_or_path, *, image_size=None, threshold=None, **kwargs):
        """Wrap `CLIPSegProcessor.from_pretrained(name_or_path, **kwargs)`."""
        return cls(CLIPSegProcessor.from_pretrained(name_or_path, **kwargs), image_size=image_size,
                   threshold=threshold)

    @classmethod
    def from_backbones(cls, clip, *, image_size: int, threshold: Optional[float] = None, **config_fields):
        """The processor of a `ClipsegReferringModel.from_backbones(clip=...)`: the CLIP checkpoint's tokenizer
        and image processor, the latter set to resize straight to `image_size` squared (no centre crop).
        Other `config_fields` (from the training script) are not processor settings and are ignored."""
        image_processor, tokenizer = load_clip_parts(clip, image_size)
        return cls(CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer), image_size=image_size,
                   threshold=threshold)

    def save_pretrained(self, save_directory, **kwargs):
        """The stock processor's files (the size and threshold live in the model config)."""
        return self.processor.save_pretrained(save_directory, **kwargs)

    def __call__(self, images=None, text=None, masks=None, return_tensors="pt", **kwargs):
        """`BatchFeature` with `pixel_values` (B, 3, S, S), `input_ids` / `attention_mask` (B, T),
        `original_sizes` (B, 2) and, with `masks`, `labels` (B, S, S); B = number of image-expression pairs."""
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}; pass `images`, `text`, `masks`, `return_tensors`")
        inputs = self.prepare_referring_inputs(images, text, masks)
        max_length = self.tokenizer.model_max_length
        limit = {"max_length": max_length} if max_length and max_length < 10_000 else {}
        return self.encode_square_pairs(inputs, return_tensors=return_tensors, padding=True, truncation=True,
                                        **limit)


def _square_size(image_processor) -> int:
    """S of an image processor that resizes to S x S (`size={"height": S, "width": S}`)."""
    size = getattr(image_processor, "size", None) or {}
    if "height" in size and size.get("height") == size.get("width"):
        return int(size["height"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ValueError(f"`image_size` is required: the image processor's size {size!r} is not a square")


__all__ = ["DEFAULT_THRESHOLD", "ClipsegReferringModel", "ClipsegReferringProcessor"]
