"""Output type shared by every refseg model."""

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput


@dataclass
class ReferringSegmentationOutput(ModelOutput):
    """Output of a referring image segmentation model.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Training loss of the active stage, returned when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Foreground mask logits at the model's output resolution; `sigmoid(logits) > threshold`
            is the predicted mask. Processors' `post_process_referring_segmentation` resizes them
            to the original image sizes.
        coarse_logits (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`, *optional*):
            Token-level (patch-grid) mask logits, for methods that have such a map.
        image_embeds (`torch.FloatTensor`, *optional*):
            Final visual features the mask was decoded from (method-specific shape).
        text_embeds (`torch.FloatTensor`, *optional*):
            Sentence-level text feature(s) used for decoding (method-specific shape).
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*):
            The detached components of `loss`, for logging.
        vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            With `output_hidden_states=True`: the image tower's embeddings and the output of each of its layers
            (CLIP: `(B, 1 + N, C)` each; SAM, for RISAM: `(B, h, w, C)`), as the method ran them (adapters,
            fusion and prompt tokens included).
        vision_attentions (`tuple(torch.FloatTensor)`, *optional*):
            With `output_attentions=True` (eager attention): each image-tower layer's attention weights
            `(B, heads, queries, keys)` (SAM: `(B * windows, heads, tokens, tokens)`).
        text_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            With `output_hidden_states=True`: the text tower's embeddings and each layer's output `(B, T, C)`.
        text_attentions (`tuple(torch.FloatTensor)`, *optional*):
            With `output_attentions=True`: each text-tower layer's attention weights `(B, heads, T, T)`.
        sam_vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Prompt-RIS only (its second image encoder, SAM's): like `vision_hidden_states`.
        sam_vision_attentions (`tuple(torch.FloatTensor)`, *optional*):
            Prompt-RIS only: like `vision_attentions`, for SAM's image encoder.
        decoder_attentions (`tuple(torch.FloatTensor)`, *optional*):
            With `output_attentions=True`: the attention weights `(B, heads, queries, keys)` of the method heads'
            multi-head attention modules (CRIS's decoder, RISAM's mask decoder, Prompt-RIS's prompt generators,
            coarse decoder and text prompter), in the order they ran.
        no_target_logits (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            With `config.no_target_head=True` (generalized referring segmentation, `refseg.no_target`): the logit
            that the expression has no referent in the image; post-processing returns an empty mask where its
            sigmoid exceeds `config.no_target_threshold`.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    coarse_logits: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    loss_dict: Optional[dict] = None
    vision_hidden_states: Optional[tuple] = None
    vision_attentions: Optional[tuple] = None
    text_hidden_states: Optional[tuple] = None
    text_attentions: Optional[tuple] = None
    sam_vision_hidden_states: Optional[tuple] = None
    sam_vision_attentions: Optional[tuple] = None
    decoder_attentions: Optional[tuple] = None
    no_target_logits: Optional[torch.FloatTensor] = None


__all__ = ["ReferringSegmentationOutput"]
