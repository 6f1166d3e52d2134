"""What every refseg model class shares: its pretrained base class.

A method's `XxxPreTrainedModel` subclasses `ReferringSegmentationPreTrainedModel` and sets
`config_class`, `base_model_prefix` and `_no_split_modules`; it overrides `_init_weights` only for
modules of its own that need other values, and defers to this one for the rest.
"""

import math
from typing import Optional

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init

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
    graph cannot; the outputs are the same, only the sharing is lost."""
    batch = pixel_values.shape[0]
    if is_exporting():  # comparing rows reads tensor data on the host: an exported graph encodes every row
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
    """`ValueError` for inputs a method's `forward` does not take (`extra`, its `**kwargs`) or a missing
    `pixel_values` / `input_ids`."""
    if extra:
        raise ValueError(f"unexpected inputs {sorted(extra)} (pop `original_sizes` from the processor output)")
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
    cos on odd ones."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding.to(dtype or torch.float32)


def sine_positions_2d(height: int, width: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine encoding of a (height, width) grid (DETR-style): (height * width, dim), row-major;
    the first `dim / 2` channels encode the column, the others the row."""
    half = dim // 2
    columns = sine_positions_1d(width, half, device=device)  # (w, dim/2)
    rows = sine_positions_1d(height, half, device=device)  # (h, dim/2)
    encoding = torch.cat(
        [columns[None, :, :].expand(height, -1, -1), rows[:, None, :].expand(-1, width, -1)], dim=-1
    )
    return encoding.reshape(height * width, dim).to(dtype or torch.float32)


class ReferringSegmentationPreTrainedModel(PreTrainedModel):
    """Weight initialisation of a method's own modules and the loading plumbing of every refseg model.

    `_init_weights` covers the module kinds the heads are made of: `Conv2d` and `ConvTranspose2d`
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


__all__ = ["LOADING_KWARGS", "ReferringSegmentationPreTrainedModel", "check_required_inputs", "check_text_inputs",
           "is_exporting", "sine_positions_1d", "sine_positions_2d", "unique_rows"]
