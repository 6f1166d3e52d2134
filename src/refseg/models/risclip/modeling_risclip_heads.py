"""RISCLIP's two heads: the Locator's similarity map and the convolutional Refiner."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RisclipLocator(nn.Module):
    """Token-level map: scaled cosine similarity between patch tokens and the [EOS] token.

    `logits = exp(logit_scale) * cos(v_patch, t_eos) + logit_bias`; `sigmoid(logits)` is the paper's
    probability map t. Scale (kept in log space so it stays positive) and bias are learnable; their
    initial values come from `RisclipConfig.locator_logit_scale_init` / `locator_logit_bias_init`.
    """

    def __init__(self, scale_init: float, bias_init: float):
        super().__init__()
        self.scale_init = scale_init
        self.bias_init = bias_init
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(self.scale_init))
        nn.init.constant_(self.logit_bias, self.bias_init)

    def forward(self, patch_embeds: torch.Tensor, eos_embeds: torch.Tensor, grid: tuple) -> torch.Tensor:
        """`patch_embeds` (B, h*w, D) and `eos_embeds` (B, D) -> logits (B, h, w)."""
        patches = F.normalize(patch_embeds, dim=-1)
        eos = F.normalize(eos_embeds, dim=-1)
        cosine = torch.einsum("bnd,bd->bn", patches, eos)
        logits = self.logit_scale.exp() * cosine + self.logit_bias
        return logits.view(-1, *grid)


class RisclipRefinerLayer(nn.Module):
    """3x3 conv -> BatchNorm -> ReLU -> x2 bilinear upsampling; (B, C_in, h, w) -> (B, C_out, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.conv(x)))
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class RisclipRefiner(nn.Module):
    """Upsamples the token-level probability map with early visual features (Appendix A).

    Layer k takes the previous output (the map itself for k = 0) concatenated with the visual
    feature map of CLIP image layer `refiner_feature_layers[k]`, bilinearly resized to match, and
    doubles the resolution; a final 1x1 projection gives background/foreground scores. Four layers
    turn the 40x40 map into 640x640 scores.

    Args:
        feature_dim (`int`): channels of the visual features (CLIP vision `hidden_size`).
        hidden_sizes (`list[int]`): output channels of each layer.
    """

    def __init__(self, feature_dim: int, hidden_sizes):
        super().__init__()
        in_channels = [1] + list(hidden_sizes[:-1])
        self.layers = nn.ModuleList(
            RisclipRefinerLayer(c_in + feature_dim, c_out) for c_in, c_out in zip(in_channels, hidden_sizes)
        )
        self.proj = nn.Conv2d(hidden_sizes[-1], 2, kernel_size=1)

    def forward(self, probability_map: torch.Tensor, features: list) -> torch.Tensor:
        """`probability_map` (B, 1, h, w), `features` one (B, C, h, w) map per layer -> (B, 2, h*2^n, w*2^n)."""
        x = probability_map
        for layer, feature in zip(self.layers, features):
            if feature.shape[-2:] != x.shape[-2:]:
                feature = F.interpolate(feature, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, feature.to(x.dtype)], dim=1))
        return self.proj(x)


__all__ = ["RisclipLocator", "RisclipRefiner", "RisclipRefinerLayer"]
