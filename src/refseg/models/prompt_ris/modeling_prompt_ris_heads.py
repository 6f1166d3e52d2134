"""The modules Prompt-RIS adds to its frozen CLIP and SAM: Cross-Modal Prompting (eqs. 5-6), the tiny
cross-attention decoder (eqs. 1-2) and the text-prompt blocks that turn CLIP's words into SAM prompts."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class PromptRisAttention(nn.Module):
    """Multi-head attention whose queries, keys and values may come from different widths, through
    `scaled_dot_product_attention`.

    Args:
        query_dim (`int`): width of the queries.
        key_dim (`int`): width of the keys and values.
        hidden_size (`int`): width of the projected queries, keys and values (split over the heads).
        num_heads (`int`): heads; must divide `hidden_size`.
        output_dim (`int`, *optional*): width of the output projection; defaults to `query_dim`.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_size: int, num_heads: int,
                 output_dim: Optional[int] = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must divide the attention width ({hidden_size})")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(query_dim, hidden_size)
        self.k_proj = nn.Linear(key_dim, hidden_size)
        self.v_proj = nn.Linear(key_dim, hidden_size)
        self.out_proj = nn.Linear(hidden_size, output_dim or query_dim)

    def forward(self, query, key, value=None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`query` (B, Lq, Dq), `key` / `value` (B, Lk, Dk) (`value` defaults to `key`), `key_mask` (B, Lk) bool,
        True = may be attended -> (B, Lq, output_dim)."""
        value = key if value is None else value
        batch, length = query.shape[:2]

        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                             heads(self.v_proj(value)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class PromptRisPromptGenerator(nn.Module):
    """One direction of Cross-Modal Prompting at one CLIP layer (eq. 5, or eq. 6 mirrored).

        T_{S2T}^i = CrossAttn(T_S^i, F_S^i)  ->  (B, n, D_target)

    `n` learnable query tokens T_S^i in the source tower's width attend to the source tower's input to layer
    i (LayerNorm'd, as the pre-LN layer itself normalises its input), and the result is projected to the target
    tower's width. Decisions (the paper gives no more): keys/values get a LayerNorm, the attention runs at
    `hidden_size`, the query tokens start at N(0, 1) (`PromptRisPreTrainedModel._init_weights`).

    Args:
        source_dim / target_dim (`int`): widths of the source and target towers.
        num_tokens (`int`): n.
        hidden_size (`int`), num_heads (`int`): the cross-attention's width and heads.
        layer_norm_eps (`float`): epsilon of the key LayerNorm.
    """

    def __init__(self, source_dim: int, target_dim: int, num_tokens: int, hidden_size: int, num_heads: int,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.empty(num_tokens, source_dim))
        self.norm = nn.LayerNorm(source_dim, eps=layer_norm_eps)
        self.attention = PromptRisAttention(source_dim, source_dim, hidden_size, num_heads, output_dim=target_dim)

    def forward(self, features: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`features` (B, N, D_source), `key_mask` (B, N) bool (text padding False) -> prompts (B, n, D_target)."""
        keys = self.norm(features)
        queries = self.query_tokens.to(keys.dtype).unsqueeze(0).expand(keys.shape[0], -1, -1)
        return self.attention(queries, keys, keys, key_mask)


class PromptRisCrossModalPrompting(nn.Module):
    """Cross-Modal Prompting (Sec. 3.2): per paired CLIP layer i, V2L prompts for text layer i from the image
    tower's input to layer i (eq. 5) and L2V prompts for image layer i from the text tower's input (eq. 6).

    `vision_to_language[i]` (image width -> text width) and `language_to_vision[i]` (text width -> image width);
    the prompts go into the stock layers through `refseg.adapters` prompt tokens (`prompt_source="external"`).
    """

    def __init__(self, vision_dim: int, text_dim: int, num_layers: int, num_tokens: int, hidden_size: int,
                 num_heads: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.num_layers = num_layers
        self.vision_to_language = nn.ModuleList(
            PromptRisPromptGenerator(vision_dim, text_dim, num_tokens, hidden_size, num_heads, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.language_to_vision = nn.ModuleList(
            PromptRisPromptGenerator(text_dim, vision_dim, num_tokens, hidden_size, num_heads, layer_norm_eps)
            for _ in range(num_layers)
        )

    def forward(self, layer: int, vision_states: torch.Tensor, text_states: torch.Tensor,
                word_mask: torch.Tensor) -> tuple:
        """Prompts for layer `layer` of both towers from their inputs to it: `vision_states` (B, 1 + N, D_I)
        ([CLS] first; the patch tokens F_IC^i are the keys), `text_states` (B, L, D_T), `word_mask` (B, L) bool
        -> (V2L prompts (B, n, D_T), L2V prompts (B, n, D_I))."""
        v2l = self.vision_to_language[layer](vision_states[:, 1:])
        l2v = self.language_to_vision[layer](text_states, word_mask)
        return v2l, l2v


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class PromptRisDecoderLayer(GradientCheckpointingLayer):
    """Eq. 1 as one pre-LN layer: F_IC <- F_IC + CrossAttn(F_IC, F_T) (word padding masked) and
    F_T <- F_T + CrossAttn(F_T, F_IC), both reading the layer's inputs; then, unless `ffn_dim` is 0, a
    feed-forward block per modality (pre-LN, residual)."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.vision_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.vision_cross_attn = PromptRisAttention(hidden_size, hidden_size, hidden_size, num_heads)
        self.text_cross_attn = PromptRisAttention(hidden_size, hidden_size, hidden_size, num_heads)
        self.vision_ffn = self.text_ffn = None
        if ffn_dim:
            self.vision_ffn_norm = nn.LayerNorm(hidden_size)
            self.text_ffn_norm = nn.LayerNorm(hidden_size)
            self.vision_ffn = _mlp(hidden_size, ffn_dim)
            self.text_ffn = _mlp(hidden_size, ffn_dim)

    def forward(self, pixels, words, word_mask):
        v, t = self.vision_norm(pixels), self.text_norm(words)
        pixels = pixels + self.vision_cross_attn(v, t, t, word_mask)
        words = words + self.text_cross_attn(t, v, v)
        if self.vision_ffn is not None:
            pixels = pixels + self.vision_ffn(self.vision_ffn_norm(pixels))
            words = words + self.text_ffn(self.text_ffn_norm(words))
        return pixels, words


class PromptRisCoarseDecoder(nn.Module):
    """The tiny cross-attention decoder (eq. 1) and the coarse map (eq. 2).

    F_IC (CLIP's final patch tokens, post-LN) and F_T (CLIP's final word features) are projected to D_C, go
    through the decoder layers and a final LayerNorm each: F'_IC (B, N, D_C), F'_T (B, L, D_C).
    t_g = F'_T at [EOS]; S'_C = F'_IC . t_g / sqrt(D_C). The 1/sqrt(D_C) (a decision; eq. 2 is the plain inner
    product) keeps the initial logits of order one instead of sqrt(D_C), so the sigmoid losses start unsaturated.
    CLIP's features carry their own position embeddings, so no positional encoding is added.
    """

    def __init__(self, vision_dim: int, text_dim: int, hidden_size: int, num_layers: int, num_heads: int,
                 ffn_dim: int):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, hidden_size)
        self.text_proj = nn.Linear(text_dim, hidden_size)
        self.layers = nn.ModuleList(PromptRisDecoderLayer(hidden_size, num_heads, ffn_dim) for _ in range(num_layers))
        self.vision_out_norm = nn.LayerNorm(hidden_size)
        self.text_out_norm = nn.LayerNorm(hidden_size)
        self.scale = hidden_size ** -0.5

    def forward(self, image_tokens, words, word_mask, eos_index) -> tuple:
        """`image_tokens` (B, N, D_I), `words` (B, L, D_T), `word_mask` (B, L) bool, `eos_index` (B,) long ->
        (S'_C (B, N), F'_IC (B, N, D_C), t_g (B, D_C))."""
        pixels, tokens = self.vision_proj(image_tokens), self.text_proj(words)
        for layer in self.layers:
            pixels, tokens = layer(pixels, tokens, word_mask)
        pixels, tokens = self.vision_out_norm(pixels), self.text_out_norm(tokens)
        sentence = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos_index]
        coarse = torch.einsum("bnc,bc->bn", pixels, sentence) * self.scale
        return coarse, pixels, sentence


class PromptRisTextPromptLayer(GradientCheckpointingLayer):
    """One text-prompt block (pre-LN, residual): self-attention over the words (padding masked),
    cross-attention to SAM's image embedding (keys carry SAM's image-wide positional embedding, as in SAM's
    own decoder; values do not), MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(hidden_size)
        self.self_attn = PromptRisAttention(hidden_size, hidden_size, hidden_size, num_heads)
        self.cross_attn_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = PromptRisAttention(hidden_size, hidden_size, hidden_size, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = _mlp(hidden_size, mlp_dim)

    def forward(self, words, word_mask, image, image_pos):
        h = self.self_attn_norm(words)
        words = words + self.self_attn(h, h, h, word_mask)
        h = self.cross_attn_norm(words)
        words = words + self.cross_attn(h, image + image_pos, image)
        return words + self.mlp(self.mlp_norm(words))


class PromptRisTextPrompter(nn.Module):
    """Text prompts P_text for SAM (Sec. 3.1): CLIP's word features F_T, projected to SAM's width D_S, are the
    queries of `num_layers` text-prompt blocks over SAM's image features F_IS; a final LayerNorm and linear
    projection give the prompts. Rows of word padding come out as zero tokens; the model leaves them out of SAM's
    decoder (`PromptRisModel._sam_decode`)."""

    def __init__(self, text_dim: int, hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(text_dim, hidden_size)
        self.layers = nn.ModuleList(PromptRisTextPromptLayer(hidden_size, num_heads, mlp_dim) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, words, word_mask, image_embeddings, image_positional_embeddings) -> torch.Tensor:
        """`words` (B, L, D_T), `word_mask` (B, L) bool, `image_embeddings` (B, D_S, h, w), its positional
        embedding (1 or B, D_S, h, w) -> text prompts (B, L, D_S)."""
        image = image_embeddings.flatten(2).transpose(1, 2)  # (B, h*w, D_S)
        image_pos = image_positional_embeddings.flatten(2).transpose(1, 2).to(image.dtype)
        hidden = self.in_proj(words)
        for layer in self.layers:
            hidden = layer(hidden, word_mask, image, image_pos)
        prompts = self.out_proj(self.out_norm(hidden))
        return prompts * word_mask.unsqueeze(-1).to(prompts.dtype)


__all__ = [
    "PromptRisAttention", "PromptRisCoarseDecoder", "PromptRisCrossModalPrompting", "PromptRisDecoderLayer",
    "PromptRisPromptGenerator", "PromptRisTextPromptLayer", "PromptRisTextPrompter",
]  # fmt: skip
