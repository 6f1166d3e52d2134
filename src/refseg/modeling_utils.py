"""What every refseg model class shares: its pretrained base class.

A method's `XxxPreTrainedModel` subclasses `ReferringSegmentationPreTrainedModel` and sets
`config_class`, `base_model_prefix` and `_no_split_modules`; it overrides `_init_weights` only for
modules of its own that need other values, and defers to this one for the rest.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init


class ReferringSegmentationPreTrainedModel(PreTrainedModel):
    """Weight initialisation of a method's own modules and the loading plumbing of every refseg model.

    `_init_weights` covers the module kinds the heads are made of: `Conv2d` (Kaiming normal, fan-out,
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
        if isinstance(module, nn.Conv2d):
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
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the saved training stage is re-applied (loading
        replaces parameters, which resets their `requires_grad`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if hasattr(model, "set_training_stage"):
            model.set_training_stage(model.config.training_stage)
        return loaded


__all__ = ["ReferringSegmentationPreTrainedModel"]
