"""What every refseg model class shares: its pretrained base class.

A method's `XxxPreTrainedModel` subclasses `ReferringSegmentationPreTrainedModel` and sets
`config_class`, `base_model_prefix` and `_no_split_modules`; it overrides `_init_weights` only for
modules of its own that need other values, and defers to this one for the rest.
"""

import contextvars
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init

from .adapters.initialization import initialize_weights_with_adapters, reset_adapter_module

# Inputs a refseg processor returns for post-processing only: `forward` accepts and ignores them, so that
# `model(**processor(images=..., text=...))` works as with any transformers model.
PROCESSOR_ONLY_INPUTS = ("original_sizes",)

# True while `forward` records hidden states or attentions: every row is then encoded on its own (the
# recorded tensors have one row per batch row; the outputs are the same up to float rounding).
_EVERY_ROW = contextvars.ContextVar("refseg_encode_every_row", default=False)

# Loading keyword arguments `from_backbones` hands to the backbones' `from_pretrained`.
LOADING_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "dtype", "attn_implementation", "device_map")


def is_exporting() -> bool:
    """True while `torch.export` (and so the ONNX exporter) or `torch.jit.trace` traces the model: code
    that reads tensor values on the host or caches on storage pointers must take its plain path then."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def unique_rows(pixel_values: torch.Tensor):
    """`(representatives, inverse)`: indices of the first row of each distinct image in `pixel_values` (B, ...)
    and, per row, the position of its image among them (B,), so `pixel_values[representatives][inverse]`
    equals `pixel_values`. Rows are compared exactly; a cheap per-row fingerprint (one host sync) picks the
    candidates, so distinct images cost no pairwise comparison. While `torch.export` (or `torch.jit.trace`)
    traces the model every row is its own image: the comparison depends on the data, which an exported
    graph cannot; the outputs are the same, only the sharing is lost. So too while `forward` records hidden
    states or attentions (each recorded tensor then has a row per batch row)."""
    batch = pixel_values.shape[0]
    if is_exporting() or _EVERY_ROW.get():  # an exported graph cannot compare rows (a host read of the data)
        every = torch.arange(batch, device=pixel_values.device)
        return every, every
    flat = pixel_values.detach().reshape(batch, -1).float()
    weights = torch.linspace(1.0, 2.0, flat.shape[1], device=flat.device)
    fingerprints = torch.stack([flat.sum(1), (flat * weights).sum(1)], dim=1).tolist()
    representatives, inverse, seen = [], [], {}
    for row, key in enumerate(map(tuple, fingerprints)):
        match = next((g for g in seen.get(key, ()) if torch.equal(flat[row], flat[representatives[g]])), None)
        if match is None:
            match = len(representatives)
            representatives.append(row)
            seen.setdefault(key, []).append(match)
        inverse.append(match)
    device = pixel_values.device
    return torch.tensor(representatives, device=device), torch.tensor(inverse, device=device)


def check_required_inputs(pixel_values, input_ids, extra: dict) -> None:
    """`ValueError` for inputs a method's `forward` does not take (`extra`, its `**kwargs`, less the
    processor-only `original_sizes`) or a missing `pixel_values` / `input_ids`."""
    unknown = sorted(set(extra) - set(PROCESSOR_ONLY_INPUTS))
    if unknown:
        raise ValueError(f"unexpected inputs {', '.join(f'`{name}`' for name in unknown)}: `forward` takes the processor's outputs (`pixel_values`, "
                         f"`input_ids`, `attention_mask`, ...), `labels` and the output arguments "
                         f"`output_hidden_states`, `output_attentions`, `return_dict`")
    if pixel_values is None or input_ids is None:
        raise ValueError("`pixel_values` and `input_ids` are required (one expression per image row)")


def check_text_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], batch: int,
                      max_positions: int) -> None:
    """`ValueError` unless `input_ids` is (batch, T) with T <= `max_positions` (CLIP's text positions) and
    `attention_mask`, when given, has its shape."""
    if input_ids.dim() != 2 or input_ids.shape[0] != batch:
        raise ValueError(f"`input_ids` must be (B, T) with B = {batch} images, got {tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_positions:
        raise ValueError(f"`input_ids` has {input_ids.shape[1]} tokens; CLIP's text tower takes at most {max_positions}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")


def sine_positions_1d(length: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed sine encoding of `length` positions (Vaswani et al.): (length, dim), sin on even channels,
    cos on odd ones. Computed in float32, or in float64 when `dtype` is float64."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    position = torch.arange(length, device=device, dtype=work)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=work) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device, dtype=work)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding.to(dtype or torch.float32)


def sine_positions_2d(height: int, width: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine encoding of a (height, width) grid (DETR-style): (height * width, dim), row-major;
    the first `dim / 2` channels encode the column, the others the row. Computed like `sine_positions_1d`
    (float64 for float64)."""
    half = dim // 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    columns = sine_positions_1d(width, half, device=device, dtype=work)  # (w, dim/2)
    rows = sine_positions_1d(height, half, device=device, dtype=work)  # (h, dim/2)
    encoding = torch.cat(
        [columns[None, :, :].expand(height, -1, -1), rows[:, None, :].expand(-1, width, -1)], dim=-1
    )
    return encoding.reshape(height * width, dim).to(dtype or torch.float32)


@dataclass(frozen=True)
class RecordedTower:
    """A backbone tower whose per-layer outputs `forward` can return: `name` prefixes the output fields
    (`<name>_hidden_states`, `<name>_attentions`), `layers` is the attribute path of its `nn.ModuleList` of
    encoder layers, `attention` the name of the attention module inside a layer (it returns
    `(output, weights)`, as transformers' attention modules do)."""

    name: str
    layers: str
    attention: str


def multi_head_attention_weights(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention weights a heads' multi-head attention module (`q_proj`, `k_proj`, `num_heads`, scaled dot
    product with the default 1/sqrt(head width), `key_mask` (B, L_k) bool, True = may be attended) forms:
    (B, heads, L_q, L_k). Recomputed from the module's weights (its forward runs SDPA, which returns none)."""
    q, k = module.q_proj(query), module.k_proj(key)
    heads = module.num_heads
    q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
    k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return scores.softmax(dim=-1)


@contextmanager
def record_tower_outputs(model: nn.Module, towers, *, hidden_states: bool, attentions: bool):
    """Forward hooks on the towers' layers while the block runs; yields `{field: [tensor, ...]}` filled in
    call order: `<name>_hidden_states` = the first layer's input (the embeddings) then every layer's output;
    `<name>_attentions` = every layer's attention weights. Images are encoded once per row meanwhile."""
    recorded, handles = {}, []

    def first_input(states):
        def hook(module, args, kwargs):
            if not states:
                states.append(args[0] if args else kwargs["hidden_states"])
        return hook

    def output(values, index):
        def hook(module, args, out):
            value = out[index] if isinstance(out, (tuple, list)) else (out if index == 0 else None)
            values.append(value)
        return hook

    token = _EVERY_ROW.set(True)
    try:
        for tower in towers:
            layers = model.get_submodule(tower.layers)
            if hidden_states:
                states = recorded[f"{tower.name}_hidden_states"] = []
                handles.append(layers[0].register_forward_pre_hook(first_input(states), with_kwargs=True))
                handles += [layer.register_forward_hook(output(states, 0)) for layer in layers]
            if attentions:
                weights = recorded[f"{tower.name}_attentions"] = []
                for layer in layers:
                    modules = [m for n, m in layer.named_modules() if n.split(".")[-1] == tower.attention]
                    handles.append(modules[0].register_forward_hook(output(weights, 1)))
        head_classes = getattr(model, "_head_attention_classes", ())
        if attentions and head_classes:
            head_weights = recorded["decoder_attentions"] = []

            def head_hook(module, args, kwargs, out):
                query, key = args[0], args[1] if len(args) > 1 else kwargs["key"]
                mask = args[3] if len(args) > 3 else next((v for k, v in kwargs.items() if "mask" in k), None)
                head_weights.append(multi_head_attention_weights(module, query, key, mask))

            handles += [m.register_forward_hook(head_hook, with_kwargs=True) for m in model.modules()
                        if isinstance(m, head_classes)]
        yield recorded
    finally:
        _EVERY_ROW.reset(token)
        for handle in handles:
            handle.remove()


def referring_forward(forward):
    """Decorator of a method's `forward`: the standard transformers arguments around it.

    - `original_sizes` (from the processor) is accepted and ignored, so `model(**processor(...))` works;
      post-processing reads it from the processor output (`target_sizes=inputs["original_sizes"]`).
    - `output_hidden_states` / `output_attentions` (default: the config's) add the backbone towers'
      per-layer hidden states / attention weights (`model._recorded_towers`) to the output, as tuples:
      `vision_hidden_states`, `text_hidden_states`, ... (attention weights need
      `attn_implementation="eager"`; `ValueError` otherwise); with `output_attentions`, also
      `decoder_attentions`: the weights of the heads' attention modules (`model._head_attention_classes`), in
      call order.
    - `return_dict=False` (or `config.return_dict=False`) returns `output.to_tuple()`: the fields that are
      not None, in declaration order.
    """

    @functools.wraps(forward)
    def wrapper(self, *args, output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        return_dict = config.return_dict if return_dict is None else return_dict
        for name in PROCESSOR_ONLY_INPUTS:
            kwargs.pop(name, None)
        if output_hidden_states or output_attentions:
            towers = self._recorded_towers
            with record_tower_outputs(self, towers, hidden_states=output_hidden_states,
                                      attentions=output_attentions) as recorded:
                outputs = forward(self, *args, **kwargs)
            for key, values in recorded.items():
                if not values:  # a tower this forward did not run (Prompt-RIS's SAM in the coarse stage)
                    continue
                if any(v is None for v in values):
                    raise ValueError(f"`output_attentions=True`: the {key[:-len('_attentions')]} tower returned no "
                                     f"attention weights; load the model with `attn_implementation=\"eager\"`")
                outputs[key] = tuple(values)
        else:
            outputs = forward(self, *args, **kwargs)
        return outputs if return_dict else outputs.to_tuple()

    return wrapper


class ReferringSegmentationPreTrainedModel(PreTrainedModel):
    """Weight initialisation of a method's own modules and the loading plumbing of every refseg model.

    `_init_weights` gives refseg's adapter modules (and PEFT LoRA layers) their own initial values, and covers
    the module kinds the heads are made of: `Conv2d` and `ConvTranspose2d`
    (Kaiming normal, fan-out,
    ReLU gain; zero bias), `BatchNorm2d` (identity: weight 1, bias 0, fresh running statistics),
    `LayerNorm` (weight 1, bias 0) and `Linear` (normal with `config.initializer_range`, zero bias).
    The backbones' own modules go to their own `_init_weights` (transformers hands each sub-model its
    modules), and tensors loaded from a checkpoint are never re-initialised.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        if reset_adapter_module(module):  # adapters, fusion blocks, prompt tokens, LoRA: their own initial values
            return
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def initialize_weights(self):
        """transformers' initialisation pass, made safe for every refseg model
        (`refseg.adapters.initialize_weights_with_adapters`): each stock backbone's modules go to the backbone's
        own `_init_weights` (CLIP's scaled normal, SAM's), the method's modules and the adapters injected into a
        backbone to this class's, and every module is visited, also one with no tensor of its own (transformers'
        shortcut for custom code would skip it: a checkpoint missing RISAM's query token left it uninitialised).
        Tensors loaded from a checkpoint are never touched."""
        initialize_weights_with_adapters(self)

    @classmethod
    def _from_clip(cls, clip, **overrides):
        """`cls(config, clip_model=...)` on `CLIPModel.from_pretrained(clip)`: `overrides` are config fields,
        except `LOADING_KWARGS`, which go to `from_pretrained`. The loaded CLIP's attention implementation
        becomes the config's (and so its sub-configs'); the modules the method adds take the loaded CLIP's
        dtype (`dtype=torch.bfloat16` gives a bf16 model, not bf16 CLIP and fp32 heads)."""
        loading = {k: overrides.pop(k) for k in LOADING_KWARGS if k in overrides}
        clip_model = CLIPModel.from_pretrained(clip, **loading)
        attn_implementation = clip_model.config._attn_implementation
        config = cls.config_class(clip_config=clip_model.config, **overrides)
        config._attn_implementation = attn_implementation  # sets it on the CLIP sub-configs too
        model = cls(config, clip_model=clip_model)
        return model.to(clip_model.dtype)  # the added modules are built in the default dtype

    def _stock_clip(self, clip_model: Optional[CLIPModel] = None) -> CLIPModel:
        """`clip_model` (loaded by `from_backbones`), or a randomly initialised stock `CLIPModel` of
        `config.clip_config`."""
        clip_config = self.config.clip_config
        if clip_config._attn_implementation is None:  # building a config resets sub-configs' choice
            clip_config._attn_implementation = self.config._attn_implementation
        return clip_model if clip_model is not None else CLIPModel._from_config(clip_config)

    def get_input_embeddings(self) -> nn.Module:
        """The word embeddings: the token embedding of CLIP's text tower (the method's only vocabulary). Tools
        look them up by this name (Accelerate's FSDP2 preparation gives them an FSDP unit of their own)."""
        for module in self.modules():  # CLIP's text embeddings, wherever the method keeps the text tower
            if hasattr(module, "token_embedding") and hasattr(module, "position_embedding"):
                return module.token_embedding
        raise NotImplementedError(f"{type(self).__name__} has no CLIP text tower")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the saved training stage is re-applied (loading
        replaces parameters, which resets their `requires_grad`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if hasattr(model, "set_training_stage"):
            model.set_training_stage(model.config.training_stage)
        return loaded


__all__ = ["LOADING_KWARGS", "PROCESSOR_ONLY_INPUTS", "RecordedTower", "ReferringSegmentationPreTrainedModel",
           "check_required_inputs", "check_text_inputs", "is_exporting", "multi_head_attention_weights",
           "record_tower_outputs", "referring_forward",
           "sine_positions_1d", "sine_positions_2d", "unique_rows"]
