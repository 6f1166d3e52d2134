"""RISAM's heads: Feature Enhancement (eqs. 1-2), Mutual-Aware Attention (eqs. 3-5) and the Mutual-Aware
Mask Decoder (eqs. 6-9)."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ...modeling_utils import sine_positions_1d


class RisamMlp(nn.Sequential):
    """Linear -> GELU -> Linear, on the last dimension (the per-level MLP of eqs. 1-2)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class RisamCBA(nn.Sequential):
    """CBA: 3x3 conv (no bias) -> BatchNorm -> GELU, keeping the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.GELU(),
        )


class RisamFeatureEnhancement(nn.Module):
    """Eqs. 1-2: F^ = CBA([MLP(F_v1), MLP(F_v2)]), F_v = CBA([MLP(F^), MLP(F_v3)]).

    Input: three SAM block outputs, each (B, H, W, C_sam) (SAM's channels-last layout). Output: F_v
    (B, C, H, W).
    """

    def __init__(self, sam_width: int, hidden_size: int):
        super().__init__()
        self.shallow_mlp = RisamMlp(sam_width, hidden_size)
        self.middle_mlp = RisamMlp(sam_width, hidden_size)
        self.early_cba = RisamCBA(2 * hidden_size, hidden_size)
        self.early_mlp = RisamMlp(hidden_size, hidden_size)
        self.deep_mlp = RisamMlp(sam_width, hidden_size)
        self.final_cba = RisamCBA(2 * hidden_size, hidden_size)

    def forward(self, shallow: torch.Tensor, middle: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        def channels_first(x):
            return x.permute(0, 3, 1, 2)

        early = self.early_cba(torch.cat([channels_first(self.shallow_mlp(shallow)),
                                          channels_first(self.middle_mlp(middle))], dim=1))  # eq. 1
        early = self.early_mlp(early.permute(0, 2, 3, 1))
        return self.final_cba(torch.cat([channels_first(early), channels_first(self.deep_mlp(deep))], dim=1))  # eq. 2


def _masked_softmax(scores: torch.Tensor, masked: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of `scores` over `dim` where `masked` (bool, broadcastable) is False.

    Masked entries get the dtype's lowest value rather than -inf, so a row with every entry masked gives
    uniform weights instead of NaN (callers make sure such rows do not occur in the first place)."""
    return scores.masked_fill(masked, torch.finfo(scores.dtype).min).softmax(dim=dim)


def relevance_masks(scores: torch.Tensor, word_mask: torch.Tensor, threshold: Optional[float],
                    reading: str = "tau_account"):
    """The attention masks of eq. 4 for both branches of a Mutual-Aware Attention block.

    Args:
        scores (`torch.Tensor` of shape `(B, L_v, L_t)`): s = Z_v Z_l^T / sqrt(C).
        word_mask (`torch.BoolTensor` of shape `(B, L_t)`): True for real tokens, False for padding.
        threshold (`float` or `None`): tau. `None` masks the padding only.
        reading (`str`): `"tau_account"` (the default, `RisamConfig.relevance_mask_reading`): a pair is
            irrelevant, and masked, where sigma(s) < tau (the reading the paper's account of tau needs);
            `"printed"`: where sigma(-s) >= tau (eq. 4 as printed).

    Returns:
        `(vision_masked, language_masked)`: bool, True = excluded. `vision_masked` (B, L_v, L_t) for the
        Vision-Guided branch (each pixel over the words), `language_masked` (B, L_t, L_v) for the
        Language-Guided branch (each word over the pixels). Padding words are excluded from every pixel's
        row. A row the relevance mask would empty entirely (a pixel no real word is relevant to, a word no
        pixel is relevant to) keeps its padding mask only: it attends as if unmasked rather than to nothing,
        so no row is ever all-masked and no NaN can arise.
    """
    padding = ~word_mask[:, None, :]  # (B, 1, L_t)
    if threshold is None:
        irrelevant = torch.zeros_like(scores, dtype=torch.bool)
    elif reading == "printed":
        irrelevant = torch.sigmoid(-scores) >= threshold  # eq. 4 as printed: M = 1 / (1 + e^s), masked where M >= tau
    elif reading == "tau_account":
        irrelevant = torch.sigmoid(scores) < threshold  # relevance sigma(s), masked where below tau
    else:
        raise ValueError(f"unknown relevance mask reading {reading!r}")
    # `torch.where` on these bool masks written as bool algebra: ONNX Runtime has no Where for bool values
    vision = irrelevant | padding
    emptied = vision.all(dim=-1, keepdim=True)
    vision = (emptied & padding) | (~emptied & vision)  # where(emptied, padding, vision)
    language = irrelevant.transpose(1, 2)
    language = language & ~language.all(dim=-1, keepdim=True)  # where(all, False, language)
    return vision, language


class RisamMutualAwareAttention(GradientCheckpointingLayer):
    """One Mutual-Aware Attention block (eqs. 3-5).

    Z_v = F_v W_v, Z_l = F_l W_l; s = Z_v Z_l^T / sqrt(C); relevance mask of eq. 4 (`relevance_masks`).
    Vision-Guided Attention weights the words for each pixel: F_lav = LN(softmax_words(s) Z_l + Z_v).
    Language-Guided Attention weights the pixels for each word: F_val = LN(softmax_pixels(s^T) Z_v + Z_l).

    The paper writes both branches with one matrix A and its transpose A^T. A softmax normalises one
    axis only, so one of A Z_l and A^T Z_v would be an unnormalised sum (over 4,096 pixels for A^T Z_v,
    which would swamp Z_l before the LayerNorm). We read A^T as "the same masked scores, normalised over
    the pixels for each word", which is what the text says the branch does ("weights different image
    regions for each word").
    """

    def __init__(self, vision_dim: int, text_dim: int, hidden_size: int, threshold: Optional[float],
                 reading: str = "tau_account"):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, hidden_size, bias=False)  # W_v
        self.text_proj = nn.Linear(text_dim, hidden_size, bias=False)  # W_l
        self.vision_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.scale = 1.0 / math.sqrt(hidden_size)
        self.threshold = threshold
        self.reading = reading  # of eq. 4: "tau_account" or "printed" (`relevance_masks`)

    def forward(self, visual: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor):
        """`visual` (B, L_v, C_v), `words` (B, L_t, C_t), `word_mask` (B, L_t) bool -> (F_lav (B, L_v, C),
        F_val (B, L_t, C))."""
        z_v, z_l = self.vision_proj(visual), self.text_proj(words)
        scores = torch.matmul(z_v, z_l.transpose(1, 2)) * self.scale  # (B, L_v, L_t)
        vision_masked, language_masked = relevance_masks(scores, word_mask, self.threshold, self.reading)
        vision_attention = _masked_softmax(scores, vision_masked)  # (B, L_v, L_t), each pixel over the words
        language_attention = _masked_softmax(scores.transpose(1, 2), language_masked)  # (B, L_t, L_v)
        language_aware_visual = self.vision_norm(torch.matmul(vision_attention, z_l) + z_v)  # eq. 5
        vision_aware_linguistic = self.text_norm(torch.matmul(language_attention, z_v) + z_l)
        return language_aware_visual, vision_aware_linguistic


class RisamAttention(nn.Module):
    """Multi-head attention with separate query/key/value inputs, through `scaled_dot_product_attention`."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, query, key, value, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`query` (B, Lq, C), `key`/`value` (B, Lk, C), `key_mask` (B, Lk) bool, True = attend -> (B, Lq, C)."""
        batch, length, width = query.shape

        def heads(x):
            return x.reshape(batch, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                             heads(self.v_proj(value)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class RisamDecoderLayer(GradientCheckpointingLayer):
    """One Mutual-Aware Mask Decoder block (eqs. 6-9).

    eq. 6: F^_lav = MHSA(F_lav) + F_lav;  eq. 8: F^_c = MHSA([F_m, F_val]) + [F_m, F_val];
    eq. 9: F-_lav = MHCA(F^_lav, F^_c, F^_c) + F^_lav.
    The words' positional encodings (`token_pos`) are added to the queries and keys of eq. 8 and to the keys
    of eq. 9 (as DETR and SAM add theirs); the query token's encoding is zero. With
    `word_position_encoding="text_features"` the decoder gets zero encodings (the words got theirs before
    the Mutual-Aware Attention). Departure: each residual is followed
    by a LayerNorm (the eqs. have none; DETR/Mask2Former and SAM's decoder, which the paper builds on, all
    normalise there), and an optional feed-forward block (`decoder_mlp_dim`, off by default) follows eq. 9.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int = 0):
        super().__init__()
        self.pixel_self_attn = RisamAttention(hidden_size, num_heads)
        self.pixel_norm = nn.LayerNorm(hidden_size)
        self.token_self_attn = RisamAttention(hidden_size, num_heads)
        self.token_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = RisamAttention(hidden_size, num_heads)
        self.cross_norm = nn.LayerNorm(hidden_size)
        self.mlp = None
        if mlp_dim:
            self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, hidden_size))
            self.mlp_norm = nn.LayerNorm(hidden_size)

    def forward(self, pixels, tokens, token_pos, token_mask):
        pixels = self.pixel_norm(pixels + self.pixel_self_attn(pixels, pixels, pixels))  # eq. 6
        positioned = tokens + token_pos
        tokens = self.token_norm(tokens + self.token_self_attn(positioned, positioned, tokens, token_mask))  # eq. 8
        pixels = self.cross_norm(pixels + self.cross_attn(pixels, tokens + token_pos, tokens, token_mask))  # eq. 9
        if self.mlp is not None:
            pixels = self.mlp_norm(pixels + self.mlp(pixels))
        return pixels, tokens


class RisamMaskDecoder(nn.Module):
    """The Mutual-Aware Mask Decoder: one learned multi-modal query token F_m, `num_layers` blocks, two
    ConvTranspose + BN x2 upsamplings of the pixels, mask = MLP(F^_m) . upsampled features.

    Input: F_lav (B, h*w, C) on the (h, w) grid, F_val (B, L_t, C), word mask (B, L_t) bool.
    Output: mask logits (B, 4h, 4w) (256x256 for SAM's 64x64 grid).

    The upsampling blocks are ConvTranspose(k=2, s=2) -> BatchNorm -> GELU (the paper names the convolution
    and the normalisation; the activation between them is SAM's, without which the two blocks would compose
    to one linear map). The query MLP is SAM's hypernetwork shape: three linear layers with ReLU, C -> C ->
    C -> the last upsampling width.
    """

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int, upsample_sizes,
                 word_positions: bool = True):
        super().__init__()
        first, last = upsample_sizes
        self.word_positions = word_positions  # add the words' sine encodings in eqs. 8-9 (False: none here)
        self.query_token = nn.Embedding(1, hidden_size)
        self.layers = nn.ModuleList(RisamDecoderLayer(hidden_size, num_heads, mlp_dim) for _ in range(num_layers))
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(hidden_size, first, 2, stride=2), nn.BatchNorm2d(first), nn.GELU(),
            nn.ConvTranspose2d(first, last, 2, stride=2), nn.BatchNorm2d(last), nn.GELU(),
        )
        self.query_mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, last),
        )

    def forward(self, pixels, words, word_mask, grid, return_state: bool = False):
        """Mask logits (B, 4h, 4w); with `return_state`, also the query token F^_m after the blocks (B, C) and
        the blocks' pixels F-_lav on the grid (B, C, h, w) (what the presence head reads)."""
        batch, _, width = pixels.shape
        query = self.query_token.weight[None].expand(batch, -1, -1)
        tokens = torch.cat([query, words], dim=1)  # F_c = [F_m, F_val]
        token_mask = torch.cat([word_mask.new_ones(batch, 1), word_mask], dim=1)
        word_pos = sine_positions_1d(words.shape[1], width, device=words.device, dtype=words.dtype)
        if not self.word_positions:
            word_pos = torch.zeros_like(word_pos)
        token_pos = torch.cat([word_pos.new_zeros(1, width), word_pos], dim=0)[None]
        for layer in self.layers:
            pixels, tokens = layer(pixels, tokens, token_pos, token_mask)
        pixel_map = pixels.transpose(1, 2).reshape(batch, width, *grid)  # (B, C, h, w)
        features = self.upsample(pixel_map)  # (B, C', 4h, 4w)
        kernel = self.query_mlp(tokens[:, 0])  # (B, C')
        logits = torch.einsum("bc,bchw->bhw", kernel, features)
        return (logits, tokens[:, 0], pixel_map) if return_state else logits


__all__ = [
    "RisamAttention", "RisamCBA", "RisamDecoderLayer", "RisamFeatureEnhancement", "RisamMaskDecoder", "RisamMlp",
    "RisamMutualAwareAttention", "relevance_masks",
]  # fmt: skip
