"""CRIS's heads: the cross-modal neck (eqs. 1-4), the vision-language decoder (eqs. 5-7) and the projector
with its per-sample dynamic kernel (eq. 8)."""


import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ...modeling_utils import is_exporting, sine_positions_1d, sine_positions_2d


class CrisConvBlock(nn.Sequential):
    """k x k conv (no bias) -> BatchNorm -> ReLU, keeping the resolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class CrisCoordConv(nn.Module):
    """CoordConv (Liu et al.): x and y coordinates in [-1, 1] appended as two channels, then a 3x3 block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CrisConvBlock(in_channels + 2, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)  # (B, 2, h, w)
        return self.conv(torch.cat([x, coords], dim=1))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CrisNeck(nn.Module):
    """Cross-modal neck, eqs. 1-4: the sentence feature gates the deepest level, two concatenations climb
    to 1/16, a 1x1 convolution aggregates the three levels and CoordConv adds the position.

    Args:
        in_channels (`list[int]`): channels of the 1/8, 1/16 and 1/32 visual levels.
        hidden_sizes (`list[int]`): neck channels at 1/8, 1/16 and 1/32 (the output has `hidden_sizes[1]`).
        text_dim (`int`): width of the sentence feature F_s.
    """

    def __init__(self, in_channels, hidden_sizes, text_dim: int):
        super().__init__()
        c2, c3, c4 = hidden_sizes
        # eq. 1: sigma(F_v4 W_v4) * sigma(F_s W_s), then BN + ReLU (as the public code)
        self.text_proj = nn.Linear(text_dim, c4)
        self.v4_proj = CrisConvBlock(in_channels[2], c4, 1)
        self.fuse4_norm = nn.Sequential(nn.BatchNorm2d(c4), nn.ReLU())
        # eq. 2: F_m3 = [sigma(F_m4 W_m4), sigma(F_v3 W_v3)], F_m2 = [sigma(F_m3 W_m3), sigma(Avg(F_v2) W_v2)]
        self.v3_proj = CrisConvBlock(in_channels[1], c3, 3)
        self.fuse3 = CrisConvBlock(c4 + c3, c3, 1)
        self.v2_proj = CrisConvBlock(in_channels[0], c2, 3)
        self.fuse2 = CrisConvBlock(c2 + c3, c3, 1)
        # eq. 3: one 3x3 block per level, then the 1x1 aggregation of their concatenation
        self.level4_proj = CrisConvBlock(c4, c3, 3)
        self.level3_proj = CrisConvBlock(c3, c3, 3)
        self.level2_proj = CrisConvBlock(c3, c3, 3)
        self.aggregate = CrisConvBlock(3 * c3, c3, 1)
        # eq. 4: CoordConv, then a 3x3 block (as the public code)
        self.coord_conv = CrisCoordConv(c3, c3)
        self.out_conv = CrisConvBlock(c3, c3, 3)

    def forward(self, features, sentence: torch.Tensor) -> torch.Tensor:
        """`features` = (v2 (B, C2, 2h, 2w), v3 (B, C3, h, w), v4 (B, C4, h/2, w/2)), `sentence` (B, D) ->
        F_v (B, hidden_sizes[1], h, w)."""
        v2, v3, v4 = features
        size = v3.shape[-2:]
        gate = F.relu(self.text_proj(sentence))[:, :, None, None]  # (B, C4, 1, 1)
        m4 = self.fuse4_norm(self.v4_proj(v4) * gate)  # (B, C4, h/2, w/2)
        m3 = self.fuse3(torch.cat([_resize(m4, size), self.v3_proj(v3)], dim=1))  # (B, C, h, w)
        v2 = self.v2_proj(v2)
        v2 = _resize(F.avg_pool2d(v2, 2, 2, ceil_mode=True), size)  # (B, C2, h, w)
        m2 = self.fuse2(torch.cat([v2, m3], dim=1))  # (B, C, h, w)
        levels = [self.level2_proj(m2), self.level3_proj(m3), _resize(self.level4_proj(m4), size)]
        fused = self.aggregate(torch.cat(levels, dim=1))
        return self.out_conv(self.coord_conv(fused))


class CrisAttention(nn.Module):
    """Multi-head attention with separate `q_proj`, `k_proj`, `v_proj`, `out_proj` (keys/values may come
    from another width, e.g. CLIP's text width)."""

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int = None, dropout: float = 0.0):
        super().__init__()
        kv_dim = kv_dim or hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_dim, hidden_size)
        self.v_proj = nn.Linear(kv_dim, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, query, key, value, key_padding_mask=None) -> torch.Tensor:
        """`query` (B, N, C), `key`/`value` (B, L, C_kv), `key_padding_mask` (B, L) bool, True = attend."""
        batch, n, _ = query.shape

        def heads(x):
            return x.reshape(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, -1))


class CrisDecoderLayer(GradientCheckpointingLayer):
    """One vision-language decoder layer (eqs. 5-7, pre-norm): self-attention over pixels, cross-attention
    from pixels to words, FFN. Positions are added to queries and keys, not values; as the public code, each
    attention output is layer-normed before its residual sum and the FFN has a LayerNorm after its ReLU."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, text_dim: int, dropout: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(hidden_size)
        self.self_attn = CrisAttention(hidden_size, num_heads, dropout=dropout)
        self.self_attn_out_norm = nn.LayerNorm(hidden_size)
        self.cross_attn_layer_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = CrisAttention(hidden_size, num_heads, kv_dim=text_dim, dropout=dropout)
        self.cross_attn_out_norm = nn.LayerNorm(hidden_size)
        self.final_layer_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, ffn_dim)
        self.ffn_norm = nn.LayerNorm(ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixels, words, pixel_pos, word_pos, word_mask) -> torch.Tensor:
        """`pixels` (B, N, C), `words` (B, L, C_t), `pixel_pos` (N, C), `word_pos` (L, C_t), `word_mask` (B, L)."""
        h = self.self_attn_layer_norm(pixels)
        q = h + pixel_pos
        pixels = pixels + self.dropout(self.self_attn_out_norm(self.self_attn(q, q, h)))  # eq. 5
        h = self.cross_attn_layer_norm(pixels)
        h = self.cross_attn(h + pixel_pos, words + word_pos, words, key_padding_mask=word_mask)
        pixels = pixels + self.dropout(self.cross_attn_out_norm(h))  # eq. 7, F'_c
        h = self.final_layer_norm(pixels)
        h = self.fc2(self.ffn_norm(self.dropout(F.relu(self.fc1(h)))))
        return pixels + self.dropout(h)  # eq. 7, F_c


class CrisDecoder(nn.Module):
    """n decoder layers, then a final LayerNorm; fixed sine encodings (2-D for pixels, 1-D for words)."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int, ffn_dim: int, text_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CrisDecoderLayer(hidden_size, num_heads, ffn_dim, text_dim, dropout) for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, visual: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """`visual` (B, C, h, w), `words` (B, L, C_t), `word_mask` (B, L) bool (True = word) -> F_c (B, C, h, w)."""
        batch, channels, height, width = visual.shape
        pixel_pos = sine_positions_2d(height, width, channels, device=visual.device, dtype=visual.dtype)
        word_pos = sine_positions_1d(words.shape[1], words.shape[2], device=words.device, dtype=words.dtype)
        pixels = visual.flatten(2).transpose(1, 2)  # (B, h*w, C)
        for layer in self.layers:
            pixels = layer(pixels, words, pixel_pos, word_pos, word_mask)
        return self.layer_norm(pixels).transpose(1, 2).reshape(batch, channels, height, width)


class CrisProjector(nn.Module):
    """Eq. 8 and the logits of eqs. 9-10: the image projector takes F_c to 1/4 resolution (two x2 bilinear
    upsamplings with 3x3 blocks, then a 1x1 conv: z_v), the text projector turns the sentence feature into a
    per-sample k x k kernel plus bias; logit = z_t * z_v as a dynamic convolution, one kernel per sample.

    Args:
        in_channels (`int`): channels of F_c.
        hidden_size (`int`): channels of z_v (256 in the paper).
        text_dim (`int`): width of the sentence feature.
        kernel_size (`int`): side of the dynamic kernel.
    """

    def __init__(self, in_channels: int, hidden_size: int, text_dim: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.up1 = CrisConvBlock(in_channels, in_channels, 3)
        self.up2 = CrisConvBlock(in_channels, hidden_size, 3)
        self.vision_proj = nn.Conv2d(hidden_size, hidden_size, 1)
        self.text_proj = nn.Linear(text_dim, hidden_size * kernel_size * kernel_size + 1)

    def project_image(self, x: torch.Tensor) -> torch.Tensor:
        """F_c (B, C, h, w) -> z_v (B, hidden_size, 4h, 4w)."""
        x = self.up1(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.up2(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.vision_proj(x)

    def kernels(self, sentence: torch.Tensor):
        """Sentence feature (B, D) -> per-sample weights (B, hidden_size, k, k) and biases (B,)."""
        z_t = self.text_proj(sentence)
        k = self.kernel_size
        return z_t[:, :-1].reshape(-1, self.hidden_size, k, k), z_t[:, -1]

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """F_c (B, C, h, w), sentence (B, D) -> logits (B, 4h, 4w)."""
        z_v = self.project_image(x)
        batch, channels, height, width = z_v.shape
        weight, bias = self.kernels(sentence)
        if is_exporting():  # ONNX's Conv fixes its group count: the same sums as one product per sample
            patches = F.unfold(z_v, self.kernel_size, padding=self.kernel_size // 2)  # (B, C k k, H W)
            out = torch.einsum("bp,bpn->bn", weight.reshape(batch, -1).to(z_v.dtype), patches)
            return (out + bias.to(z_v.dtype)[:, None]).reshape(batch, height, width)
        # all samples as groups of one convolution: group b sees only z_v[b] and kernel b
        out = F.conv2d(z_v.reshape(1, batch * channels, height, width), weight.to(z_v.dtype), bias.to(z_v.dtype),
                       padding=self.kernel_size // 2, groups=batch)
        return out.reshape(batch, height, width)


__all__ = [
    "CrisAttention", "CrisConvBlock", "CrisCoordConv", "CrisDecoder", "CrisDecoderLayer", "CrisNeck",
    "CrisProjector", "sine_positions_1d", "sine_positions_2d",
]  # fmt: skip
