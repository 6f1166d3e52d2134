"""Generalized referring segmentation: the optional presence ("no target") head every method can carry.

An expression may name nothing in the image (gRefCOCO's no-target expressions) or several things (their
union is the target mask; nothing new is needed for that). With `config.no_target_head=True` a method adds a
`NoTargetHead` and its output gains `no_target_logits` (B,): the logit that the expression has **no**
referent. `post_process_referring_segmentation` returns an empty mask where `sigmoid(no_target_logits)`
exceeds the no-target threshold (`config.no_target_threshold`, 0.5 by default).

What the head reads, per method (each the place where the expression has already met the image):

| method | summary (B, D) | pixels (B, C, h, w) | mask logits |
| --- | --- | --- | --- |
| RISCLIP | [EOS] after PostFusion | PostFusion patch tokens | the Locator's map |
| CRIS | F_s, the sentence that made the projector's kernel | F_c, the decoder's output | the projector's logits |
| RISAM | the multi-modal query token F^_m after the decoder | the decoder's pixels F-_lav | the mask logits |
| Prompt-RIS | t_g, the coarse decoder's sentence | F'_IC, its pixels | the coarse map S'_C |

`NoTargetHead` pools the pixels under the method's own predicted mask (softmax of the mask logits, resized
to the pixel grid by area), normalises the summary and the pooled pixels (LayerNorm), appends two numbers of
the mask itself (its largest logit, its mean probability) and maps all of it through a two-layer MLP (GELU)
to one logit. An absent referent shows in each: a low mask everywhere, pooled pixels that do not match the
sentence.

Training: with `labels`, the loss gains `config.no_target_loss_weight` x BCE between `no_target_logits` and
the no-target target, which is read from the labels themselves (`no_target_targets`: a row whose label mask
is empty everywhere has no referent), so no new input is needed; `loss_dict["no_target"]` logs it. The mask
losses keep their meaning on an empty target (docs/generalized.md).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

def validate_no_target_config(config) -> None:
    """`ValueError` for a bad `no_target_head` (bool), `no_target_loss_weight` (>= 0) or
    `no_target_threshold` (in (0, 1))."""
    if not isinstance(config.no_target_head, bool):
        raise ValueError(f"`no_target_head` must be a bool, got {config.no_target_head!r}")
    weight = config.no_target_loss_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"`no_target_loss_weight` must be a number >= 0, got {weight!r}")
    threshold = config.no_target_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"`no_target_threshold` must be in (0, 1), got {threshold!r}")


class NoTargetHead(nn.Module):
    """The logit that an expression has no referent in the image, from what a method decoded its mask with.

    Args:
        summary_dim (`int`): width D of the summary vector.
        pixel_dim (`int`): width C of the pixel features.
        hidden_dim (`int`, *optional*): the MLP's hidden width (default: `summary_dim`).

    Inputs: `summary` (B, D), `pixels` (B, C, h, w), `mask_logits` (B, H, W) at any resolution.
    Output: `no_target_logits` (B,).
    """

    def __init__(self, summary_dim: int, pixel_dim: int, hidden_dim: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        hidden_dim = hidden_dim or summary_dim
        self.summary_norm = nn.LayerNorm(summary_dim, eps=eps)
        self.pixel_norm = nn.LayerNorm(pixel_dim, eps=eps)
        self.fc1 = nn.Linear(summary_dim + pixel_dim + 2, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, summary: torch.Tensor, pixels: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        mask_logits = mask_logits.to(pixels.dtype)
        on_grid = mask_logits
        if tuple(mask_logits.shape[-2:]) != (height, width):
            on_grid = F.adaptive_avg_pool2d(mask_logits.unsqueeze(1), (height, width)).squeeze(1)
        weights = on_grid.reshape(batch, -1).softmax(dim=-1)  # where the method put the referent
        pooled = torch.einsum("bn,bcn->bc", weights, pixels.reshape(batch, pixels.shape[1], -1))
        flat = mask_logits.reshape(batch, -1)
        mask_stats = torch.stack([flat.amax(dim=-1), flat.sigmoid().mean(dim=-1)], dim=-1)  # (B, 2)
        features = torch.cat([self.summary_norm(summary.to(pixels.dtype)), self.pixel_norm(pooled), mask_stats], dim=-1)
        return self.fc2(F.gelu(self.fc1(features))).squeeze(-1)


def no_target_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B,) float: 1 where a row's label mask (B, ...) is empty (no referent), 0 otherwise."""
    return (labels.reshape(labels.shape[0], -1).amax(dim=1) <= 0).to(torch.float32)


def add_no_target_loss(config, no_target_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                       loss: Optional[torch.Tensor], loss_dict: Optional[dict]):
    """`loss` + `config.no_target_loss_weight` x BCE(no_target_logits, `no_target_targets(labels)`) and
    `loss_dict["no_target"]`, when the model has the head and labels are given; else unchanged."""
    if no_target_logits is None or labels is None or loss is None:
        return loss, loss_dict
    target = no_target_targets(labels).to(no_target_logits.device)
    term = F.binary_cross_entropy_with_logits(no_target_logits.float(), target)
    loss = loss + config.no_target_loss_weight * term.to(loss.dtype)
    return loss, {**(loss_dict or {}), "no_target": term.detach()}


def apply_no_target(masks: list, no_target_logits: Optional[torch.Tensor], threshold: float) -> list:
    """The post-processed bool `masks` (B x (height, width)) with every mask emptied whose
    `sigmoid(no_target_logits)` exceeds `threshold`."""
    if no_target_logits is None:
        return masks
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`no_target_threshold` must be in (0, 1), got {threshold}")
    if no_target_logits.shape != (len(masks),):
        raise ValueError(f"`no_target_logits` must be ({len(masks)},), one per mask, got {tuple(no_target_logits.shape)}")
    absent = (no_target_logits.detach().float().sigmoid() > threshold).tolist()
    return [torch.zeros_like(mask) if empty else mask for mask, empty in zip(masks, absent)]


__all__ = ["NoTargetHead", "add_no_target_loss", "apply_no_target", "no_target_targets",
           "validate_no_target_config"]
