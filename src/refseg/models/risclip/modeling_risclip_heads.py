"""RISCLIP's two heads: the Locator's similarity map and the convolutional Refiner."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


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

    With `projection_dim` (refseg's default, 64), each feature map is first reduced to that many
    channels by a 1x1 conv at CLIP's token grid (`feature_projections[k]`) and only the reduced map is
    upsampled. A 1x1 conv commutes with bilinear resizing (whose weights sum to 1), so this equals
    projecting the upsampled raw features, i.e. a Refiner whose 3x3 conv weights on the features have
    rank <= `projection_dim` (up to the projection's bias, which the zero padding drops at the border
    and BatchNorm nearly absorbs elsewhere); it avoids upsampling and convolving the
    raw `feature_dim`-channel maps (768 x 320 x 320 per image at RISCLIP-B's last layer). `None` is
    the paper's literal design. `reset_projections` gives the projections (and the final `proj`) their
    own initial values.

    The Refiner is built without advancing the global RNG (the model's `post_init` draws its weights
    again), so its shape does not change what `post_init` then draws for the adapters and fusion
    blocks: switching the projection on or off leaves the Locator stage's start unchanged.

    Args:
        feature_dim (`int`): channels of the visual features (CLIP vision `hidden_size`).
        hidden_sizes (`list[int]`): output channels of each layer.
        projection_dim (`int`, *optional*): channels of the projected features; `None`: no projection.
    """

    def __init__(self, feature_dim: int, hidden_sizes, projection_dim: Optional[int] = None):
        super().__init__()
        in_channels = [1] + list(hidden_sizes[:-1])
        feature_channels = feature_dim if projection_dim is None else projection_dim
        with torch.random.fork_rng(devices=[]):  # initial draws from a copy of the CPU RNG
            self.feature_projections = None
            if projection_dim is not None:
                self.feature_projections = nn.ModuleList(
                    nn.Conv2d(feature_dim, projection_dim, kernel_size=1) for _ in hidden_sizes
                )
            self.layers = nn.ModuleList(
                RisclipRefinerLayer(c_in + feature_channels, c_out) for c_in, c_out in zip(in_channels, hidden_sizes)
            )
            self.proj = nn.Conv2d(hidden_sizes[-1], 2, kernel_size=1)
            self.reset_projections()

    @torch.no_grad()
    def reset_projections(self, head_std: float = 0.02) -> None:
        """The two initial values a generic (Kaiming fan-out, ReLU gain) conv init gets wrong here.

        - `feature_projections`: linear maps (no norm or ReLU follows), so fan-in with unit gain
          (std `feature_dim ** -0.5`) and zero bias: the projected features start at the scale of the
          raw ones, next to the probability map they are concatenated with.
        - `proj`: normal with std `head_std` and zero bias, so the scores start near 0 (p = 0.5); the
          fan-out init of a 2-channel 1x1 conv has std 1, i.e. random initial logits of std ~4.
        """
        for conv in self.feature_projections or ():
            init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
            init.zeros_(conv.bias)
        init.normal_(self.proj.weight, std=head_std)
        init.zeros_(self.proj.bias)

    def forward(self, probability_map: torch.Tensor, features: list) -> torch.Tensor:
        """`probability_map` (B, 1, h, w), `features` one (B, C, h, w) map per layer -> (B, 2, h*2^n, w*2^n)."""
        x = probability_map
        for k, (layer, feature) in enumerate(zip(self.layers, features)):
            feature = feature.to(x.dtype)
            if self.feature_projections is not None:
                feature = self.feature_projections[k](feature)  # (B, P, h, w), at the token grid
            if feature.shape[-2:] != x.shape[-2:]:
                feature = F.interpolate(feature, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, feature], dim=1))
        return self.proj(x)


__all__ = ["RisclipLocator", "RisclipRefiner", "RisclipRefinerLayer"]
