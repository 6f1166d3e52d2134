"""Adapter modules and the layer wrapper that puts them inside a frozen encoder layer.

`BottleneckAdapter` is the down-act-up block of Houlsby et al. / AdaptFormer. `AdaptedEncoderLayer`
wraps a stock pre-LN encoder layer (`CLIPEncoderLayer`): it keeps the untouched layer as
`base_layer` and its adapters in `nn.ModuleDict`s keyed by adapter name (PEFT's layout), and runs
the layer's own submodules with the adapters added after the attention and MLP residuals.
"""

from typing import Optional

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .config import BottleneckAdapterConfig


class AdapterModule(nn.Module):
    """Marker base for every module refseg adds to a model (adapters, fusion blocks).

    Subclasses implement `reset_parameters()`, which sets their initial values (zero-initialised
    outputs included); models call it from `_init_weights` so transformers' generic initialisation
    never overwrites them.
    """

    def reset_parameters(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


class BottleneckAdapter(AdapterModule):
    """`AD(x) = scale * up(dropout(act(down(x))))`; returns the residual branch only (not `x + AD(x)`).

    `down` (C -> r) is Kaiming-normal, `up` (r -> C) and its bias start at zero, so a fresh adapter
    outputs exactly zero. `scale` (C,) exists only with `channel_scale=True`.

    Args:
        hidden_size (`int`): C, the width of the features it adapts.
        bottleneck_dim (`int`): r.
        activation (`str`): a key of `transformers.activations.ACT2FN`.
        dropout (`float`): dropout on the bottleneck activations.
        channel_scale (`bool`): learnable per-channel output scale.
        scale_init (`float`): its initial value.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_dim: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        channel_scale: bool = False,
        scale_init: float = 1.0,
    ):
        super().__init__()
        self.scale_init = scale_init
        self.down = nn.Linear(hidden_size, bottleneck_dim)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck_dim, hidden_size)
        self.scale = nn.Parameter(torch.empty(hidden_size)) if channel_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # `nn.init.*` are looked up at call time so transformers' init guard (which skips loaded
        # tensors) applies when this runs inside `from_pretrained`.
        nn.init.kaiming_normal_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if self.scale is not None:
            nn.init.constant_(self.scale, self.scale_init)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        out = self.up(self.dropout(self.act(self.down(hidden_states))))
        return out * self.scale if self.scale is not None else out


class AdapterLayer:
    """Mixin for wrappers: `base_layer` is the stock module, adapter parameters live in the
    `nn.ModuleDict`s named in `adapter_layer_names`, keyed by adapter name (as in PEFT)."""

    adapter_layer_names: tuple = ()

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def adapter_names(self) -> list:
        names = []
        for attr in self.adapter_layer_names:
            names += [n for n in getattr(self, attr) if n not in names]
        return names

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]


def _check_pre_ln_block(module: nn.Module, name: str) -> None:
    missing = [a for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp") if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"target module {name!r} ({type(module).__name__}) is not a pre-LN encoder layer: it has no {missing}"
        )


def _add_adapters(hidden_states: torch.Tensor, adapters: Optional[nn.ModuleDict]) -> torch.Tensor:
    if adapters:
        for adapter in adapters.values():
            hidden_states = hidden_states + adapter(hidden_states)
    return hidden_states


def pre_ln_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    attn_adapters: Optional[nn.ModuleDict] = None,
    mlp_adapters: Optional[nn.ModuleDict] = None,
    value_attention: bool = False,
    **kwargs,
) -> torch.Tensor:
    """One pre-LN encoder layer (`CLIPEncoderLayer`'s own steps), with residual adapters.

    Args:
        block: the stock layer (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp`).
        hidden_states (`torch.Tensor` of shape `(B, N, C)`): layer input.
        attention_mask: passed to `self_attn` unchanged, as the stock layer does.
        attn_adapters / mlp_adapters: adapters added after the attention / MLP residual
            (`h = h + AD(h)`, eqs. 3-4 of RISCLIP).
        value_attention (`bool`): MaskCLIP's dense path: the attention output is replaced by
            `out_proj(v_proj(LN1(x)))` (every token keeps its own value), the rest is unchanged.
        **kwargs: forwarded to `self_attn` (e.g. `is_causal=True` for the CLIP text tower).

    Returns:
        `torch.Tensor` of shape `(B, N, C)`.
    """
    residual = hidden_states
    hidden_states = block.layer_norm1(hidden_states)
    if value_attention:
        attn = block.self_attn
        hidden_states = attn.out_proj(attn.v_proj(hidden_states))
    else:
        hidden_states, _ = block.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states = _add_adapters(hidden_states, attn_adapters)

    residual = hidden_states
    hidden_states = block.layer_norm2(hidden_states)
    hidden_states = block.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return _add_adapters(hidden_states, mlp_adapters)


class AdaptedEncoderLayer(AdapterLayer, GradientCheckpointingLayer):
    """A stock pre-LN encoder layer (`base_layer`) with bottleneck adapters after its residuals.

    Runs the base layer's own submodules in the stock order, so with zero-initialised adapters
    the output is bit-for-bit the stock layer's. Forward hooks on the base layer keep firing (so
    `output_hidden_states=True` still works on an adapted CLIP). A `GradientCheckpointingLayer`, so
    `model.gradient_checkpointing_enable()` checkpoints it like the layer it replaces.
    """

    adapter_layer_names = ("adapter_attn", "adapter_mlp")

    def __init__(self, base_layer: nn.Module, name: str = "base_layer"):
        super().__init__()
        _check_pre_ln_block(base_layer, name)
        self.base_layer = base_layer
        self.adapter_attn = nn.ModuleDict()
        self.adapter_mlp = nn.ModuleDict()

    @property
    def hidden_size(self) -> int:
        return self.base_layer.layer_norm1.normalized_shape[0]

    def update_layer(self, adapter_name: str, config: BottleneckAdapterConfig) -> None:
        """Add (or replace) adapter `adapter_name` as described by `config`."""
        weight = self.base_layer.layer_norm1.weight
        for position, container in (("attn", self.adapter_attn), ("mlp", self.adapter_mlp)):
            if position not in config.positions:
                if adapter_name in container:
                    del container[adapter_name]
                continue
            container[adapter_name] = BottleneckAdapter(
                self.hidden_size,
                config.bottleneck_dim,
                activation=config.activation,
                dropout=config.dropout,
                channel_scale=config.channel_scale,
                scale_init=config.scale_init,
            ).to(device=weight.device, dtype=weight.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        value_attention: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); see `pre_ln_block_forward`."""
        output = pre_ln_block_forward(
            self.base_layer,
            hidden_states,
            attention_mask,
            attn_adapters=self.adapter_attn,
            mlp_adapters=self.adapter_mlp,
            value_attention=value_attention,
            **kwargs,
        )
        return self._run_base_layer_hooks((hidden_states, attention_mask), kwargs, output)

    def _run_base_layer_hooks(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """The wrapper stands in for `base_layer`, which is no longer called as a whole: forward hooks
        registered on it (transformers' recorders behind `output_hidden_states=True`, user hooks) are
        run here with the wrapper's inputs and output."""
        base = self.base_layer
        for hook_id, hook in list(base._forward_hooks.items()):
            if hook_id in base._forward_hooks_with_kwargs:
                result = hook(base, args, kwargs, output)
            else:
                result = hook(base, args, output)
            if result is not None:
                output = result
        return output


def encoder_layer_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    value_attention: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Run an encoder layer whether or not it is wrapped (stock layers get no adapters)."""
    if isinstance(layer, AdaptedEncoderLayer):
        return layer(hidden_states, attention_mask, value_attention=value_attention, **kwargs)
    if value_attention:
        return pre_ln_block_forward(layer, hidden_states, attention_mask, value_attention=True, **kwargs)
    return layer(hidden_states, attention_mask, **kwargs)


__all__ = [
    "AdaptedEncoderLayer",
    "AdapterLayer",
    "AdapterModule",
    "BottleneckAdapter",
    "encoder_layer_forward",
    "pre_ln_block_forward",
]
