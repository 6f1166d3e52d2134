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
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    coarse_logits: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    loss_dict: Optional[dict] = None


__all__ = ["ReferringSegmentationOutput"]
