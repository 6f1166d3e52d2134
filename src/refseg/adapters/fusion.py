"""Cross-modal fusion adapters: RISCLIP's PreFusion (inside the encoders) and PostFusion (after them).

Both run pre-LN blocks whose residual branches start at zero, so a fresh fusion adapter leaves
the features it receives unchanged, as the paper's Appendix A asks ("we also initialize our Fusion
Adapters such that the outputs are initially zero"). PreFusion: the back-projections `s2v`/`s2t`
are zero. PostFusion: the value projections and output-projection biases of its attentions are
zero (the paper's wording), and so is the last projection `fc2` of both MLP branches. Appendix A
names only the value projections; without `fc2 = 0` the MLP branches would move the tokens of a
freshly built RISCLIP away from CLIP's MaskCLIP map, which the zero start exists to keep.

A PreFusion adapter joins a layer of the image tower with a layer of the text tower, so it cannot
wrap a single module: the model that owns it runs the two towers in lockstep and calls it
between the paired layers (see `refseg.models.risclip`).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers.modeling_layers import GradientCheckpointingLayer

from ..modeling_utils import is_exporting
from .layers import AdapterModule


class FusionAttention(AdapterModule):
    """Multi-head attention whose queries come from one stream and keys/values from another.

    `softmax(q_h k_h^T * exp(t_h) / sqrt(d_h) + mask) v_h` per head, through SDPA. For a few queries on
    many keys (`folds_keys`: the text tokens reading the image tokens) the key and value projections are
    folded into the queries (`_attend_folded`), which never projects the keys; same equations, same
    parameters, so saved weights load either way.

    Args:
        dim (`int`): width of queries, keys and values (and of the output).
        num_heads (`int`): heads; `dim` must be divisible by it.
        learnable_temperature (`bool`): a learnable per-head multiplier `exp(t_h)` (t_h = 0 at
            init) on the attention logits, on top of the usual `1/sqrt(head_dim)`.
        zero_value (`bool`): zero-initialise `v_proj` (and the `out_proj` bias), so the block
            starts with an output of exactly zero.
        dropout (`float`): dropout on the attention weights.
    """

    def __init__(
        self, dim: int, num_heads: int, *, learnable_temperature: bool = False, zero_value: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"`num_heads` ({num_heads}) must divide the fusion width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.zero_value = zero_value
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.empty(num_heads)) if learnable_temperature else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        if self.zero_value:
            nn.init.zeros_(self.v_proj.weight)
        if self.temperature is not None:
            nn.init.zeros_(self.temperature)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Attend from `queries` (B, Nq, D) to `keys` (B, Nk, D); returns (B, Nq, D).

        `key_padding_mask` (B, Nk): 1/True for real tokens, 0/False for padding (never attended).
        """
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Nk)
        if self.folds_keys(queries.shape[1], keys.shape[1]):
            out = self._attend_folded(queries, keys, mask)
        else:
            out = self._attend(queries, keys, mask)
        return self.out_proj(out)

    def folds_keys(self, num_queries: int, num_keys: int) -> bool:
        """Whether `forward` moves the key/value projections onto the queries (`_attend_folded`): when that
        costs fewer multiply-adds, i.e. for a few queries on many keys (text tokens reading 1,600 image tokens),
        where projecting every key dominates. While `torch.export` traces the model with a dynamic word length
        (ONNX export), a branch on that size would pin the graph to the lengths on one side of it: the keys are
        folded then only where that holds for every length the trace allows."""
        dim, heads = self.num_heads * self.head_dim, self.num_heads
        # per batch row and 1/(2D): projected keys Nk D + attention Nq Nk vs. folding Nq D + attention H Nq Nk
        folds = num_keys * (dim - (heads - 1) * num_queries) > num_queries * dim
        return statically_known_true(folds) if is_exporting() else folds

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q_h k_h^T * exp(t_h) / sqrt(d_h)) v_h per head; (B, Nq, D) before `out_proj`."""
        q = self._heads(self.q_proj(queries))
        k = self._heads(self.k_proj(keys))
        v = self._heads(self.v_proj(keys))
        if self.temperature is not None:
            q = q * self.temperature.exp().view(1, -1, 1, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self._dropout_p(), scale=1.0 / math.sqrt(self.head_dim)
        )  # (B, H, Nq, d_h), laid out so that the transpose below is a view
        return out.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1)

    def _attend_folded(self, queries: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """`_attend` with the key and value projections folded into the queries (the same equations):

            q_h . (W_k,h x_j + b_k,h) = [q_h W_k,h, q_h . b_k,h] . [x_j, 1]
            sum_j p_hj (W_v,h x_j + b_v,h) = W_v,h (sum_j p_hj x_j) + (sum_j p_hj) b_v,h

        Every head attends over the same raw keys [x_j, 1] (one SDPA call, heads stacked along the queries),
        and the last channel of its output is sum_j p_hj (1, or what dropout left of it), so `b_v` is exact
        under dropout too. The keys are never projected: O(Nq D^2 + H Nq Nk D) instead of O(Nk D^2 + Nq Nk D).
        """
        batch, num_queries, _ = queries.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(queries).view(batch, num_queries, heads, head_dim)
        if self.temperature is not None:
            q = q * self.temperature.exp().view(1, 1, -1, 1)
        folded_q = torch.cat([
            torch.einsum("bnhe,hed->bhnd", q, self.k_proj.weight.view(heads, head_dim, -1)),
            torch.einsum("bnhe,he->bhn", q, self.k_proj.bias.view(heads, head_dim)).unsqueeze(-1),
        ], dim=-1).reshape(batch, 1, heads * num_queries, -1)  # (B, 1, H*Nq, D+1)
        raw_keys = torch.cat([keys, keys.new_ones(*keys.shape[:2], 1)], dim=-1).unsqueeze(1)  # (B, 1, Nk, D+1)
        attended = F.scaled_dot_product_attention(
            folded_q, raw_keys, raw_keys, attn_mask=mask, dropout_p=self._dropout_p(),
            scale=1.0 / math.sqrt(head_dim),
        ).reshape(batch, heads, num_queries, -1)  # [sum_j p_hj x_j, sum_j p_hj]
        values = torch.einsum("bhnd,hed->bnhe", attended[..., :-1], self.v_proj.weight.view(heads, head_dim, -1))
        values = values + attended[..., -1:].transpose(1, 2) * self.v_proj.bias.view(heads, head_dim)
        return values.reshape(batch, num_queries, -1)


class FusionMLP(nn.Module):
    """Linear -> GELU -> Linear, (B, N, D) -> (B, N, D).

    `reset_parameters` draws `fc1` Xavier-uniform and zeroes `fc2`, so the branch starts at zero.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _channel_scale(dim: int, enabled: bool) -> Optional[nn.Parameter]:
    return nn.Parameter(torch.empty(dim)) if enabled else None


def _scaled(x: torch.Tensor, scale: Optional[nn.Parameter]) -> torch.Tensor:
    return x if scale is None else x * scale


class PreFusionAdapter(AdapterModule, GradientCheckpointingLayer):
    """RISCLIP PreFusion (eqs. 5-8) between image layer n and text layer m.

        s_v = W_v2s LN(f_v),  s_t = W_t2s LN(f_t)                   (5)
        m_v = MHA(q = LN(s_v), k = v = LN(s_t))  (text padding masked)   (6-7)
        m_t = MHA(q = LN(s_t), k = v = LN(s_v))
        f_v <- f_v + W_s2v m_v,  f_t <- f_t + W_s2t m_t                (8)

    `W_s2v`/`W_s2t` start at zero, so a fresh adapter returns its inputs unchanged.

    Args:
        vision_dim / text_dim (`int`): widths of the two towers' hidden states.
        fusion_dim (`int`): width of the shared space.
        num_heads (`int`): heads of both cross-attentions.
        learnable_temperature (`bool`), dropout (`float`): see `FusionAttention`.
        channel_scale (`bool`) / scale_init (`float`): learnable per-channel scales on the two
            outputs before they are added back.
    """

    def __init__(
        self, vision_dim: int, text_dim: int, fusion_dim: int, num_heads: int, *,
        learnable_temperature: bool = False, channel_scale: bool = False, scale_init: float = 1.0,
        dropout: float = 0.0, layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.scale_init = scale_init
        self.norm_vision = nn.LayerNorm(vision_dim, eps=layer_norm_eps)
        self.norm_text = nn.LayerNorm(text_dim, eps=layer_norm_eps)
        self.v2s = nn.Linear(vision_dim, fusion_dim)
        self.t2s = nn.Linear(text_dim, fusion_dim)
        self.norm_shared_vision = nn.LayerNorm(fusion_dim, eps=layer_norm_eps)
        self.norm_shared_text = nn.LayerNorm(fusion_dim, eps=layer_norm_eps)
        self.vision_cross_attn = FusionAttention(
            fusion_dim, num_heads, learnable_temperature=learnable_temperature, dropout=dropout
        )
        self.text_cross_attn = FusionAttention(
            fusion_dim, num_heads, learnable_temperature=learnable_temperature, dropout=dropout
        )
        self.s2v = nn.Linear(fusion_dim, vision_dim)
        self.s2t = nn.Linear(fusion_dim, text_dim)
        self.vision_scale = _channel_scale(vision_dim, channel_scale)
        self.text_scale = _channel_scale(text_dim, channel_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for norm in (self.norm_vision, self.norm_text, self.norm_shared_vision, self.norm_shared_text):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        for proj in (self.v2s, self.t2s):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        for proj in (self.s2v, self.s2t):  # zero: the adapter starts as the identity
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        for scale in (self.vision_scale, self.text_scale):
            if scale is not None:
                nn.init.constant_(scale, self.scale_init)
        self.vision_cross_attn.reset_parameters()
        self.text_cross_attn.reset_parameters()

    def forward(
        self, vision_states: torch.Tensor, text_states: torch.Tensor, text_padding_mask: Optional[torch.Tensor] = None
    ) -> tuple:
        """Fuse `vision_states` (B, Nv, Cv) and `text_states` (B, Nt, Ct); returns both, same shapes.

        `text_padding_mask` (B, Nt): 1 for real tokens, 0 for padding.
        """
        shared_v = self.norm_shared_vision(self.v2s(self.norm_vision(vision_states)))
        shared_t = self.norm_shared_text(self.t2s(self.norm_text(text_states)))
        fused_v = self.s2v(self.vision_cross_attn(shared_v, shared_t, text_padding_mask))
        fused_t = self.s2t(self.text_cross_attn(shared_t, shared_v))
        return vision_states + _scaled(fused_v, self.vision_scale), text_states + _scaled(fused_t, self.text_scale)


class PostFusionLayer(AdapterModule, GradientCheckpointingLayer):
    """RISCLIP PostFusion: cross-attention, self-attention, MLP (each pre-LN, residual) per modality.

    Both streams live in CLIP's joint space after the final projections, so there is no shared
    projection. The two cross-attentions read the layer's inputs (as in PreFusion); text padding
    is masked wherever text tokens are keys. Every branch starts at zero (value projections, as
    Appendix A says, and the MLPs' `fc2`, see the module docstring), so a fresh layer is the identity.

    Args:
        dim (`int`): width of both streams (CLIP `projection_dim`).
        num_heads (`int`), learnable_temperature (`bool`), dropout (`float`): see `FusionAttention`.
        mlp_ratio (`float`): MLP hidden width / `dim`.
        channel_scale (`bool`) / scale_init (`float`): learnable per-channel scales on each of the six
            branch outputs (cross-attention, self-attention, MLP; per modality) before its residual sum
            (Appendix A, "Additional Techniques").
    """

    BRANCHES = ("cross_vision", "cross_text", "self_vision", "self_text", "mlp_vision", "mlp_text")

    def __init__(
        self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, learnable_temperature: bool = False,
        channel_scale: bool = False, scale_init: float = 1.0, dropout: float = 0.0, layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.scale_init = scale_init
        attn_kwargs = {"learnable_temperature": learnable_temperature, "zero_value": True, "dropout": dropout}
        hidden = int(dim * mlp_ratio)
        self.norms = nn.ModuleDict({name: nn.LayerNorm(dim, eps=layer_norm_eps) for name in self.BRANCHES})
        self.vision_cross_attn = FusionAttention(dim, num_heads, **attn_kwargs)
        self.text_cross_attn = FusionAttention(dim, num_heads, **attn_kwargs)
        self.vision_self_attn = FusionAttention(dim, num_heads, **attn_kwargs)
        self.text_self_attn = FusionAttention(dim, num_heads, **attn_kwargs)
        self.vision_mlp = FusionMLP(dim, hidden)
        self.text_mlp = FusionMLP(dim, hidden)
        self.scales = (
            nn.ParameterDict({name: nn.Parameter(torch.empty(dim)) for name in self.BRANCHES}) if channel_scale else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for norm in self.norms.values():
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        for attn in (self.vision_cross_attn, self.text_cross_attn, self.vision_self_attn, self.text_self_attn):
            attn.reset_parameters()
        for mlp in (self.vision_mlp, self.text_mlp):
            mlp.reset_parameters()
        if self.scales is not None:
            for scale in self.scales.values():
                nn.init.constant_(scale, self.scale_init)

    def _scale(self, name: str) -> Optional[nn.Parameter]:
        return None if self.scales is None else self.scales[name]

    def forward(
        self, vision_states: torch.Tensor, text_states: torch.Tensor, text_padding_mask: Optional[torch.Tensor] = None
    ) -> tuple:
        """`vision_states` (B, Nv, D), `text_states` (B, Nt, D) -> both, same shapes."""
        n, s = self.norms, self._scale
        v_in, t_in = n["cross_vision"](vision_states), n["cross_text"](text_states)
        v = vision_states + _scaled(self.vision_cross_attn(v_in, t_in, text_padding_mask), s("cross_vision"))
        t = text_states + _scaled(self.text_cross_attn(t_in, v_in), s("cross_text"))
        v_norm, t_norm = n["self_vision"](v), n["self_text"](t)
        v = v + _scaled(self.vision_self_attn(v_norm, v_norm), s("self_vision"))
        t = t + _scaled(self.text_self_attn(t_norm, t_norm, text_padding_mask), s("self_text"))
        v = v + _scaled(self.vision_mlp(n["mlp_vision"](v)), s("mlp_vision"))
        t = t + _scaled(self.text_mlp(n["mlp_text"](t)), s("mlp_text"))
        return v, t


__all__ = ["FusionAttention", "FusionMLP", "PostFusionLayer", "PreFusionAdapter"]
