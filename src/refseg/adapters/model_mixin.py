"""`AdaptedModelMixin`: trainable-weights I/O for refseg models built on frozen backbones.

A refseg method model holds stock backbones (with adapters injected) plus its own heads. What a
training run produces is only what the method adds: the adapter parameters (found by walking the
wrappers) and the full state of the submodules listed in `modules_to_save`. This mixin gives every
method the same API over those weights:

- `trainable_state_dict()` / `load_trainable_state_dict(state)`: in-memory (training checkpoints);
- `save_adapter_weights(dir)` / `load_adapter_weights(dir)`: `adapter_config.json` +
  `adapter_model.safetensors`;
- `XxxModel.from_adapter_weights(dir, **backbones)`: backbone checkpoints + that folder -> the model.

(The names differ from transformers' `PeftAdapterMixin.load_adapter`, which every `PreTrainedModel`
has and which loads PEFT adapters. An adapter folder is not a `from_pretrained` folder: load it with
`from_adapter_weights`.)

The model class sets `modules_to_save` and `backbone_attributes` (`{"clip": "clip"}`: keyword of
`from_backbones` -> attribute holding that backbone) and provides `from_backbones`.
"""

import os
from dataclasses import fields
from safetensors.torch import load_file

from .config import ADAPTER_CONFIG_NAME, AdapterConfig
from .io import ADAPTER_WEIGHTS_NAME, adapter_state_dict, load_adapter_state_dict, save_adapter


class AdaptedModelMixin:
    """Mixin for `PreTrainedModel`s made of frozen backbones + adapters + heads (see module docstring)."""

    modules_to_save: tuple = ()
    backbone_attributes: dict = {}

    def trainable_state_dict(self) -> dict:
        """Everything the method adds to its pretrained backbones, whatever the training stage:
        adapter (and LoRA) parameters found by walking the wrappers, plus the parameters and buffers
        of `modules_to_save`. Keys as in `state_dict()`."""
        return adapter_state_dict(self, self.modules_to_save)

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load what `trainable_state_dict` returned; `ValueError` on missing/unexpected keys or shapes."""
        load_adapter_state_dict(self, state, self.modules_to_save)

    def backbone_sources(self) -> dict:
        """`{from_backbones keyword: checkpoint name or path}` of the loaded backbones (empty names dropped)."""
        sources = {}
        for keyword, attr in self.backbone_attributes.items():
            name = getattr(getattr(self, attr).config, "name_or_path", "")
            if name:
                sources[keyword] = name
        return sources

    def method_config_dict(self) -> dict:
        """The config's own fields, without backbone sub-configs or transformers' generic fields."""
        config_cls = type(self.config)
        own = set(getattr(config_cls, "__annotations__", {})) - set(config_cls.sub_configs)
        return {k: v for k, v in self.config.to_dict().items() if k in own}

    def adapter_file_config(self) -> AdapterConfig:
        """The config written to `adapter_config.json`: the injected adapter's own settings (if any),
        `modules_to_save`, the backbone checkpoints and the method's config fields."""
        injected = None
        for module in self.modules():
            configs = getattr(module, "refseg_adapter_config", None)
            if configs:
                injected = next(iter(configs.values()))
                break
        settings = {} if injected is None else {f.name: getattr(injected, f.name) for f in fields(injected)}
        settings.update(
            modules_to_save=list(self.modules_to_save),
            base_model_name_or_path=self.backbone_sources() or None,
            method_config=self.method_config_dict(),
        )
        return (type(injected) if injected is not None else AdapterConfig)(**settings)

    def save_adapter_weights(self, save_directory) -> None:
        """Write the trainable weights as `adapter_config.json` + `adapter_model.safetensors`."""
        save_adapter(self, save_directory, self.adapter_file_config())

    def load_adapter_weights(self, load_directory) -> None:
        """Load a `save_adapter_weights` folder into this model (built on the same backbone checkpoints)."""
        weights = os.path.join(load_directory, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights) or not os.path.isfile(os.path.join(load_directory, ADAPTER_CONFIG_NAME)):
            raise ValueError(
                f"`load_directory` {load_directory!s} must hold {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
            )
        self.load_trainable_state_dict(load_file(weights))

    @classmethod
    def from_adapter_weights(cls, adapter_directory, **backbones_and_loading):
        """Rebuild a model from backbone checkpoints and a `save_adapter_weights` folder.

        Backbones default to the checkpoints recorded in the folder; pass e.g. `clip=<path>` to use
        another copy of the same weights. Other keyword arguments go to `from_backbones`.
        """
        config = AdapterConfig.from_pretrained(adapter_directory)
        recorded = config.base_model_name_or_path or {}
        if isinstance(recorded, str):
            recorded = {next(iter(cls.backbone_attributes), "backbone"): recorded}
        sources = {**recorded, **{k: v for k, v in backbones_and_loading.items() if k in cls.backbone_attributes}}
        missing = [k for k in cls.backbone_attributes if k not in sources]
        if missing:
            raise ValueError(f"backbone(s) {missing} must be given: the adapter folder records none")
        loading = {k: v for k, v in backbones_and_loading.items() if k not in cls.backbone_attributes}
        model = cls.from_backbones(**sources, **(config.method_config or {}), **loading)
        model.load_adapter_weights(adapter_directory)
        return model


__all__ = ["AdaptedModelMixin"]
