"""Prompt tokens: n tokens inserted into an encoder layer's input and removed from its output.

The third adapter kind of `refseg.adapters` (after bottleneck adapters and fusion blocks), for
prompt learning on a frozen CLIP (VPT-deep; Prompt-RIS Cross-Modal Prompting, eqs. 5-6).
`PromptedEncoderLayer` wraps a stock pre-LN encoder layer (`CLIPEncoderLayer`), kept untouched
as `base_layer`. For an input `x` (B, L, D) and prompts `P` (B, n, D) it computes

    [_; y] = E([P; x])

i.e. it inserts the prompts at sequence index `insert_at` (0: before [CLS]/[SOS], the paper's
choice), runs the stock layer's own submodules on (B, n + L, D) with the attention mask extended
to n + L, and returns the L token positions only, (B, L, D). Nothing of the prompts is carried to
the next layer: each layer gets fresh prompts (VPT-deep), so the prompt rows' outputs are dropped.

Where the prompts come from (`PromptTokenConfig.prompt_source`):

- `"static"`: the layer's own learnable `(n, D)` parameter (`PromptTokens.weight`, N(0, init_std^2)),
  the same for every sample;
- `"external"`: tensors the owning model supplies for this forward, `(B, n, D)` (or `(n, D)` /
  `(1, n, D)`, broadcast over the batch). A layer given none runs as the stock layer.

How a model supplies prompts for one forward (no state is left on the modules):

1. as the third argument of the call, `layer(hidden_states, attention_mask, prompts, **kwargs)`:
   for models that run the layers themselves (Prompt-RIS, below). Pass it positionally: under
   reentrant gradient checkpointing only positional tensors get gradients;
2. `with supply_prompts(model, {"text_model.encoder.layers.0": p0, ...}):` (keys: module names in
   `model`, or the layers themselves) when a stock forward (`CLIPTextModel.forward`) drives the
   layers. The mapping lives in a `contextvars.ContextVar`, so two threads (or asyncio tasks) that
   run the same model each see only their own prompts, and nothing outlives the `with` block.

Either way the prompts are looked up in `PromptedEncoderLayer.__call__`, before the
(gradient-checkpointed) `forward` starts, and handed to `forward` as an argument: the recomputation
of a checkpointed layer during `backward()`, which runs after the `with` block has closed and
possibly in autograd's own thread, uses the very same tensors. `with disable_prompts(model):` runs
every prompted layer of `model` as its stock layer (static prompts included), the same way.

The attention mask rule (`extend_attention_mask`). The extended mask is built from the one the
tower passes to its layers, whatever its form: `None` (the vision tower; the text tower under sdpa
without padding, with `is_causal=True`), a 4-D boolean mask (sdpa: True = may attend) or a 4-D
additive float mask (eager: 0 or `finfo(dtype).min`), each of shape (B or 1, 1 or H, L, L).

- A token row (query) keeps what the stock mask gave it over the tokens, unchanged: causal order
  among the words, padding masked; and it may attend to every prompt. So with the text tower's
  causal mask every word (the [SOS] included) sees all n prompts, whatever `insert_at`.
- A prompt row attends to every prompt and to every token that is not padding (a token is padding
  when no row of the stock mask may attend to it). Its output is discarded, so this choice changes
  no kept feature; it is the one that needs no mask at all where the tower passes none (the
  vision tower keeps `None`, so sdpa keeps its fastest, mask-free kernels), and it is the same in
  every mask format, so eager and sdpa agree.
- No row is ever fully masked (every row sees the n >= 1 prompts), so no NaN and no dependence on
  how a kernel treats an empty row. (The stock text tower does have empty rows, for left padding:
  eager then averages over all keys, sdpa on CPU returns zeros.)
- A mask that has to be built or extended is a 4-D tensor, which the "eager" and "sdpa"
  implementations take; other implementations (flash-attention's 2-D padding masks, flex's
  `BlockMask`) get a `ValueError` there. The vision tower (no mask) works under any.

Hooks: the wrapper stands in for `base_layer` in the model, so forward hooks on `base_layer`
(transformers' recorders behind `output_hidden_states=True` among them) see the wrapper's L-token
input and output, as for `AdaptedEncoderLayer`: a prompted CLIP's `hidden_states` have the stock
shapes. Hooks on the submodules (`base_layer.layer_norm1`, `.self_attn`, `.mlp`) see n + L tokens,
and so do recorded attention weights (`output_attentions=True` under eager): (B, H, n+L, n+L).

How Prompt-RIS will use the external source. Its prompts for layer k of one tower are computed by
cross-attention from the other tower's input to layer k (eqs. 5-6), so the model runs the two
towers in lockstep and calls every layer itself, with transformers' own mask for the text tower:

```python
>>> from transformers.masking_utils import create_causal_mask
>>> inject_adapter(clip, PromptTokenConfig(num_tokens=16, prompt_source="external"))
>>> vision, text = clip.vision_model, clip.text_model
>>> h_v = vision.pre_layrnorm(vision.embeddings(pixel_values))             # (B, 1 + N, D_I)
>>> h_t = text.embeddings(input_ids=input_ids)                              # (B, L, D_T)
>>> mask = create_causal_mask(config=text.config, inputs_embeds=h_t, attention_mask=attention_mask, cache=None)
>>> for k, (layer_v, layer_t) in enumerate(zip(vision.encoder.layers, text.encoder.layers)):
...     p_v2l = v2l[k](h_v)                        # CrossAttn(T_V^k, F_IC^k) -> (B, 16, D_T)
...     p_l2v = l2v[k](h_t, attention_mask)        # CrossAttn(T_L^k, F_T^k)  -> (B, 16, D_I)
...     h_t = layer_t(h_t, mask, p_v2l, is_causal=True)   # every word sees the 16 prompts
...     h_v = layer_v(h_v, None, p_l2v)
```

The learnable queries `T_V^k`, `T_L^k` and the cross-attentions live in the Prompt-RIS model (its
`modules_to_save`); the prompted layers hold no parameters with `prompt_source="external"`.
"""

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .config import PromptTokenConfig
from .injection import register_adapter_wrapper
from .layers import AdaptedEncoderLayer, AdapterLayer, AdapterModule, _check_pre_ln_block, pre_ln_block_forward

# Attention implementations that take the 4-D masks `extend_attention_mask` builds.
MASK_EXTENDING_IMPLEMENTATIONS = ("eager", "sdpa")


# --------------------------------------------------------------------------- sequence and mask helpers
def insert_prompts(hidden_states: torch.Tensor, prompts: torch.Tensor, insert_at: int = 0) -> torch.Tensor:
    """`[x_{<p}; P; x_{>=p}]`: (B, L, D) and (B, n, D) -> (B, n + L, D), prompts at index `insert_at` = p."""
    if insert_at == 0:
        return torch.cat([prompts, hidden_states], dim=1)
    return torch.cat([hidden_states[:, :insert_at], prompts, hidden_states[:, insert_at:]], dim=1)


def remove_prompts(hidden_states: torch.Tensor, num_tokens: int, insert_at: int = 0) -> torch.Tensor:
    """Inverse of `insert_prompts`: (B, n + L, D) -> (B, L, D), contiguous."""
    if insert_at == 0:
        return hidden_states[:, num_tokens:].contiguous()
    return torch.cat([hidden_states[:, :insert_at], hidden_states[:, insert_at + num_tokens:]], dim=1)


def extend_attention_mask(
    attention_mask: Optional[torch.Tensor],
    num_tokens: int,
    *,
    seq_len: int,
    insert_at: int = 0,
    is_causal: bool = False,
    device: Optional[torch.device] = None,
) -> Optional[torch.Tensor]:
    """The attention mask for a sequence of L tokens with n prompts inserted at `insert_at`.

    Args:
        attention_mask: what the tower passes to its layers: `None`, or a 4-D mask of shape
            (B or 1, 1 or H, L, L), boolean (True = may attend; sdpa) or additive float (0 = may
            attend, `finfo(dtype).min` = masked; eager).
        num_tokens (`int`): n >= 1.
        seq_len (`int`): L.
        insert_at (`int`): p, the sequence index of the first prompt (0 <= p <= L).
        is_causal (`bool`): the tower is causal; used only when `attention_mask` is None (the
            sdpa text tower without padding), where it stands for the plain causal L x L mask.

    Returns:
        `None` when `attention_mask` is None and the tower is not causal (every row may attend to
        every position, prompts included: nothing to mask); otherwise a mask of the same kind and
        dtype, shape (B or 1, 1 or H, n + L, n + L): token rows keep their stock pattern over the
        tokens and may attend to every prompt; prompt rows may attend to every prompt and to every
        token that some row of the stock mask may attend to (i.e. every token but padding).
    """
    if attention_mask is None:
        if not is_causal:
            return None
        attention_mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        if isinstance(attention_mask, torch.Tensor):
            kind = f"{attention_mask.dim()}-D tensor"
        else:
            kind = type(attention_mask).__name__
        raise ValueError(
            f"`attention_mask` must be None or a 4-D mask (B, 1, L, L) to be extended for prompts, got a {kind}"
        )
    if tuple(attention_mask.shape[-2:]) != (seq_len, seq_len):
        raise ValueError(
            f"`attention_mask` must cover the {seq_len} tokens as (..., {seq_len}, {seq_len}), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if not 0 <= insert_at <= seq_len:
        raise ValueError(f"`insert_at` ({insert_at}) must lie in [0, {seq_len}] for a sequence of {seq_len} tokens")
    batch, heads = attention_mask.shape[:2]
    n, length = num_tokens, seq_len
    like = {"device": attention_mask.device}
    if attention_mask.dtype == torch.bool:
        keys_not_padding = attention_mask.any(dim=-2, keepdim=True)  # (b, h, 1, L)
        prompt_rows_on_tokens = keys_not_padding.expand(batch, heads, n, length)
        top = torch.cat([torch.ones(batch, heads, n, n, dtype=torch.bool, **like), prompt_rows_on_tokens], dim=-1)
        bottom = torch.cat([torch.ones(batch, heads, length, n, dtype=torch.bool, **like), attention_mask], dim=-1)
    else:
        dtype = attention_mask.dtype
        masked = torch.finfo(dtype).min
        keys_not_padding = (attention_mask > masked).any(dim=-2, keepdim=True)
        open_value = torch.zeros((), dtype=dtype, **like)
        prompt_rows_on_tokens = torch.where(
            keys_not_padding, open_value, torch.full((), masked, dtype=dtype, **like)
        ).expand(batch, heads, n, length)
        top = torch.cat([torch.zeros(batch, heads, n, n, dtype=dtype, **like), prompt_rows_on_tokens], dim=-1)
        bottom = torch.cat([torch.zeros(batch, heads, length, n, dtype=dtype, **like), attention_mask], dim=-1)
    extended = torch.cat([top, bottom], dim=-2)  # in the order [prompts; tokens]
    if insert_at:
        order = torch.cat(
            [torch.arange(n, n + insert_at), torch.arange(0, n), torch.arange(n + insert_at, n + length)]
        ).to(extended.device)
        extended = extended.index_select(-2, order).index_select(-1, order)
    return extended


# --------------------------------------------------------------------------- per-forward prompt context
@dataclass(frozen=True)
class _PromptContext:
    supplied: dict = field(default_factory=dict)  # {PromptedEncoderLayer: tensor}
    disabled: frozenset = frozenset()  # layers run as their stock layer


_PROMPT_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("refseg_prompt_context", default=_PromptContext())


def prompted_layers(model: nn.Module) -> Iterator:
    """`(name, PromptedEncoderLayer)` for every prompted layer of `model` (a layer itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, PromptedEncoderLayer):
            yield name, module


def _resolve_layer(model: Optional[nn.Module], key) -> "PromptedEncoderLayer":
    if isinstance(key, str):
        if model is None:
            raise ValueError(f"`prompts` names the layer {key!r}, so `model` must be given")
        try:
            layer = model.get_submodule(key)
        except AttributeError as err:
            raise ValueError(f"`prompts` names {key!r}, which is not a submodule of the model") from err
    else:
        layer = key
    if not isinstance(layer, PromptedEncoderLayer):
        raise ValueError(
            f"`prompts` keys must be prompted layers (or their names), got {type(layer).__name__} for {key!r}"
        )
    return layer


@contextlib.contextmanager
def supply_prompts(model: Optional[nn.Module], prompts: Mapping[Union[str, nn.Module], torch.Tensor]):
    """Within the block, each named layer uses the given prompts whenever it is called without explicit ones.

    Args:
        model: the model the names in `prompts` are resolved in (may be None when the keys are layers).
        prompts: `{module name or PromptedEncoderLayer: tensor (B, n, D) | (n, D) | (1, n, D)}`.

    Nested blocks add to (and override) the outer one. The mapping is held in a `ContextVar`:
    private to the thread / asyncio task that opened the block, gone when it closes. Shapes are
    checked when a layer uses its prompts.
    """
    outer = _PROMPT_CONTEXT.get()
    supplied = dict(outer.supplied)
    for key, tensor in prompts.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"`prompts[{key!r}]` must be a tensor, got {type(tensor).__name__}")
        supplied[_resolve_layer(model, key)] = tensor
    token = _PROMPT_CONTEXT.set(_PromptContext(supplied=supplied, disabled=outer.disabled))
    try:
        yield
    finally:
        _PROMPT_CONTEXT.reset(token)


@contextlib.contextmanager
def disable_prompts(model: nn.Module):
    """Within the block, every prompted layer of `model` runs exactly as its stock layer (no prompts,
    static or supplied). Thread-/task-private like `supply_prompts`."""
    outer = _PROMPT_CONTEXT.get()
    layers = frozenset(layer for _, layer in prompted_layers(model))
    token = _PROMPT_CONTEXT.set(_PromptContext(supplied=outer.supplied, disabled=outer.disabled | layers))
    try:
        yield
    finally:
        _PROMPT_CONTEXT.reset(token)


# --------------------------------------------------------------------------- modules
class PromptTokens(AdapterModule):
    """The prompts of one layer for one adapter: a learnable `weight` (n, D) for the static source,
    nothing for the external one (it checks and broadcasts the supplied tensors).

    Args:
        num_tokens (`int`): n.
        hidden_size (`int`): D, the layer's width.
        source (`str`): "static" or "external".
        init_std (`float`): std of the normal initialisation of `weight`.
        insert_at (`int`): sequence index of the first prompt.
        dropout (`float`): dropout on the prompts (applied by the layer).
    """

    def __init__(
        self,
        num_tokens: int,
        hidden_size: int,
        *,
        source: str = "static",
        init_std: float = 0.02,
        insert_at: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.hidden_size = hidden_size
        self.source = source
        self.init_std = init_std
        self.insert_at = insert_at
        self.dropout = nn.Dropout(dropout)
        if source == "static":
            self.weight = nn.Parameter(torch.empty(num_tokens, hidden_size))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # looked up at call time, so transformers' init guard (which skips loaded tensors) applies
            nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, batch_size: int, prompts: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The prompts for a batch: (B, n, D), or None (external source and nothing supplied).

        `prompts` (supplied, external source only): (B, n, D), (1, n, D) or (n, D).
        """
        if self.source == "static":
            if prompts is not None:
                raise ValueError(
                    "`prompts` were supplied to a layer with static prompt tokens (`prompt_source='static'`); "
                    "use `prompt_source='external'` for prompts computed by the model"
                )
            return self.weight.unsqueeze(0).expand(batch_size, -1, -1)
        if prompts is None:
            return None
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 3:
            raise ValueError(f"`prompts` must have shape (B, n, D) or (n, D), got {tuple(prompts.shape)}")
        if prompts.shape[1] != self.num_tokens:
            raise ValueError(
                f"`prompts` hold {prompts.shape[1]} tokens, but the layer's `num_tokens` is {self.num_tokens}"
            )
        if prompts.shape[2] != self.hidden_size:
            raise ValueError(
                f"`prompts` have width {prompts.shape[2]}, but the layer's hidden size is {self.hidden_size}"
            )
        if prompts.shape[0] not in (1, batch_size):
            raise ValueError(f"`prompts` have batch size {prompts.shape[0]}, expected 1 or {batch_size}")
        return prompts.expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return (
            f"num_tokens={self.num_tokens}, hidden_size={self.hidden_size}, source={self.source!r}, "
            f"insert_at={self.insert_at}"
        )


class PromptedEncoderLayer(AdapterLayer, GradientCheckpointingLayer):
    """A stock pre-LN encoder layer (`base_layer`) run on its input with n prompt tokens inserted.

    `(B, L, D) -> (B, L, D)`; inside, the base layer's own submodules run on `(B, n + L, D)` with
    the attention mask extended by `extend_attention_mask` (module docstring). Without prompts for
    a forward (external source and none supplied, or inside `disable_prompts`) it runs the stock
    steps on the input as is, bit for bit the stock layer.

    Holds one prompt adapter (`prompt_tokens[adapter_name]`, a `PromptTokens`). A
    `GradientCheckpointingLayer`, so `model.gradient_checkpointing_enable()` checkpoints it like
    the layer it replaces; supplied prompts are resolved in `__call__`, outside the checkpoint.
    """

    adapter_layer_names = ("prompt_tokens",)

    def __init__(self, base_layer: nn.Module, name: str = "base_layer"):
        super().__init__()
        _check_pre_ln_block(base_layer, name)
        self.base_layer = base_layer
        self.prompt_tokens = nn.ModuleDict()

    @property
    def hidden_size(self) -> int:
        return self.base_layer.layer_norm1.normalized_shape[0]

    @property
    def active_prompts(self) -> Optional[PromptTokens]:
        """The layer's `PromptTokens`, or None once its adapter is deleted."""
        return next(iter(self.prompt_tokens.values()), None)

    def update_layer(self, adapter_name: str, config: PromptTokenConfig) -> None:
        """Add (or replace) prompt adapter `adapter_name`. A layer holds one prompt adapter: another
        name raises a `ValueError` (the prompts of two adapters would not say in which order they go)."""
        others = [name for name in self.prompt_tokens if name != adapter_name]
        if others:
            raise ValueError(
                f"this layer already holds the prompt adapter {others[0]!r}; delete it before adding {adapter_name!r}"
            )
        weight = self.base_layer.layer_norm1.weight
        self.prompt_tokens[adapter_name] = PromptTokens(
            config.num_tokens,
            self.hidden_size,
            source=config.prompt_source,
            init_std=config.init_std,
            insert_at=config.insert_at,
            dropout=config.dropout,
        ).to(device=weight.device, dtype=weight.dtype)

    def __call__(self, hidden_states, attention_mask=None, prompts=None, **kwargs):
        # Resolve the per-forward context here, before `forward` (which gradient checkpointing may
        # replay during backward, outside the `with` block and in another thread).
        context = _PROMPT_CONTEXT.get()
        if self in context.disabled:
            kwargs["prompts_enabled"] = False
        elif prompts is None:
            prompts = context.supplied.get(self)
        return super().__call__(hidden_states, attention_mask, prompts, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        prompts: Optional[torch.Tensor] = None,
        *,
        prompts_enabled: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Run the layer with its prompts.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, L, D)`): the layer input.
            attention_mask: the tower's mask for the L tokens (None, or 4-D boolean / additive float).
            prompts (`torch.Tensor` of shape `(B, n, D)`, `(1, n, D)` or `(n, D)`, *optional*): the
                prompts for this forward (external source only); None: none supplied.
            prompts_enabled (`bool`): False runs the stock layer (what `disable_prompts` sets).
            **kwargs: forwarded to `self_attn` as the stock layer does (`is_causal=True` in the text tower).

        Returns:
            `torch.Tensor` of shape `(B, L, D)`.
        """
        tokens = self.active_prompts
        if tokens is None:
            if prompts is not None:
                raise ValueError("`prompts` were supplied to a layer that holds no prompt adapter")
            resolved = None
        else:
            resolved = tokens(hidden_states.shape[0], prompts) if prompts_enabled else None
        if resolved is None:
            output = pre_ln_block_forward(self.base_layer, hidden_states, attention_mask, **kwargs)
        else:
            length = hidden_states.shape[1]
            if tokens.insert_at > length:
                raise ValueError(f"`insert_at` ({tokens.insert_at}) exceeds the sequence length {length}")
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(self.base_layer.self_attn, "is_causal", False)
            mask = extend_attention_mask(
                attention_mask,
                tokens.num_tokens,
                seq_len=length,
                insert_at=tokens.insert_at,
                is_causal=bool(is_causal),
                device=hidden_states.device,
            )
            if mask is not None:
                attn_config = getattr(self.base_layer.self_attn, "config", None)
                implementation = getattr(attn_config, "_attn_implementation", None)
                if implementation is not None and implementation not in MASK_EXTENDING_IMPLEMENTATIONS:
                    raise ValueError(
                        f"prompted layers extend 4-D attention masks, which the {list(MASK_EXTENDING_IMPLEMENTATIONS)} "
                        f"attention implementations take; this layer uses {implementation!r}"
                    )
            resolved = tokens.dropout(resolved.to(device=hidden_states.device, dtype=hidden_states.dtype))
            extended = insert_prompts(hidden_states, resolved, tokens.insert_at)
            output = pre_ln_block_forward(self.base_layer, extended, mask, **kwargs)
            output = remove_prompts(output, tokens.num_tokens, tokens.insert_at)
        # forward hooks on `base_layer` (output_hidden_states recorders) see the L-token view
        return AdaptedEncoderLayer._run_base_layer_hooks(self, (hidden_states, attention_mask), kwargs, output)


# `inject_adapter` finds the wrapper class of a config here.
register_adapter_wrapper(PromptTokenConfig, PromptedEncoderLayer)


__all__ = [
    "MASK_EXTENDING_IMPLEMENTATIONS",
    "PromptTokens",
    "PromptedEncoderLayer",
    "disable_prompts",
    "extend_attention_mask",
    "insert_prompts",
    "prompted_layers",
    "remove_prompts",
    "supply_prompts",
]
