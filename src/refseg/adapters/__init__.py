"""PEFT-style injection of trainable modules into frozen Hugging Face backbones.

PEFT (0.21) has no bottleneck adapter and no way to register an outside tuner type, so this
package follows PEFT's shape on its own:

- a config dataclass per adapter kind (`BottleneckAdapterConfig`; help text on every field,
  validated in `__post_init__`, saved as `adapter_config.json`);
- wrappers that keep the stock module as `base_layer` and their adapters in `nn.ModuleDict`s
  keyed by adapter name (`AdaptedEncoderLayer`);
- `inject_adapter(model, config)` finds targets by module name and swaps wrappers in with
  `setattr`; `unload(model)` swaps the untouched stock modules back (LoRA layers from `peft`
  included); trainable parameters are found by walking the wrappers
  (`adapter_parameters`, `mark_only_adapters_trainable`);
- `save_adapter` / `load_adapter` write and read exactly `adapter_config.json` +
  `adapter_model.safetensors` (adapter weights plus any `modules_to_save` heads).

Prompt tokens (`PromptTokenConfig`, `PromptedEncoderLayer`) insert n tokens into a layer's input
and drop them from its output (VPT-deep, Prompt-RIS Cross-Modal Prompting): the layer's own
learnable tokens, or prompts the owning model supplies for each forward (`layer(x, mask, prompts)`,
`supply_prompts`); the attention mask is extended so every token also sees the prompts (the text
tower's causal order and padding kept). See `refseg.adapters.prompts`.

Cross-modal fusion adapters (`PreFusionAdapter`, `PostFusionLayer`) join two towers, so no single
module can be wrapped for them: a method model owns them and calls them between its towers'
layers. `AdaptedModelMixin` gives a method model the same API over everything it adds to its
backbones (`trainable_state_dict`, `save_adapter_weights`, `from_adapter_weights`), and
`initialize_weights_with_adapters` keeps transformers' init pass from overwriting zero-initialised
adapters that sit inside a backbone sub-model. Plain LoRA on a backbone goes through the real `peft` (`LoraConfig`,
`inject_adapter_in_model`); `unload` and the walkers understand its layers too.

Example:

```python
>>> from transformers import CLIPModel
>>> from refseg.adapters import BottleneckAdapterConfig, inject_adapter, save_adapter, unload
>>> clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")
>>> inject_adapter(clip, BottleneckAdapterConfig(bottleneck_dim=64))  # every encoder layer of both towers
>>> save_adapter(clip, "my-adapter")   # adapter_config.json + adapter_model.safetensors
>>> unload(clip)                        # the stock layers, untouched
```
"""

from .config import (
    ADAPTER_CONFIG_NAME,
    CLIP_ENCODER_LAYERS,
    AdapterConfig,
    BottleneckAdapterConfig,
    PromptTokenConfig,
    module_matches,
    register_adapter_config,
)
from .fusion import FusionAttention, PostFusionLayer, PreFusionAdapter
from .initialization import initialize_weights_with_adapters, is_adapter_module, reset_adapter_module
from .injection import (
    adapter_layers,
    adapter_named_parameters,
    adapter_parameters,
    inject_adapter,
    mark_only_adapters_trainable,
    register_adapter_wrapper,
    unload,
)
from .io import ADAPTER_WEIGHTS_NAME, adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from .layers import AdaptedEncoderLayer, AdapterLayer, AdapterModule, BottleneckAdapter, encoder_layer_forward
from .model_mixin import AdaptedModelMixin
from .prompts import (
    PromptedEncoderLayer,
    PromptTokens,
    disable_prompts,
    extend_attention_mask,
    insert_prompts,
    prompted_layers,
    remove_prompts,
    supply_prompts,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CLIP_ENCODER_LAYERS",
    "AdaptedEncoderLayer",
    "AdaptedModelMixin",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModule",
    "BottleneckAdapter",
    "BottleneckAdapterConfig",
    "FusionAttention",
    "PostFusionLayer",
    "PreFusionAdapter",
    "PromptTokenConfig",
    "PromptTokens",
    "PromptedEncoderLayer",
    "adapter_layers",
    "adapter_named_parameters",
    "adapter_parameters",
    "adapter_state_dict",
    "disable_prompts",
    "encoder_layer_forward",
    "extend_attention_mask",
    "initialize_weights_with_adapters",
    "inject_adapter",
    "insert_prompts",
    "is_adapter_module",
    "load_adapter",
    "load_adapter_state_dict",
    "mark_only_adapters_trainable",
    "module_matches",
    "prompted_layers",
    "register_adapter_config",
    "register_adapter_wrapper",
    "remove_prompts",
    "reset_adapter_module",
    "save_adapter",
    "supply_prompts",
    "unload",
]
