"""Weight initialisation for `PreTrainedModel`s that hold stock backbones with injected adapters.

transformers initialises a composite model by handing each sub-model's modules to that
sub-model's `_init_weights` (CLIP's for everything under a `CLIPModel`). Adapters injected into a
backbone would then get the backbone's generic init (normal weights), destroying their
zero-initialised outputs. `initialize_weights_with_adapters(model)` walks the model the same way
but hands every adapter module, wherever it sits, to the outer model's `_initialize_weights`, and
the stock module a wrapper holds (`base_layer`) back to its backbone's. Loaded tensors are never
touched: the pass runs under transformers' init guard, which skips tensors marked as loaded.

A method's `_init_weights` calls `reset_adapter_module(module)` first, which (re)initialises
refseg adapter modules (`AdapterModule.reset_parameters`) and PEFT LoRA layers (`B = 0`).
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init

from .layers import AdapterLayer, AdapterModule

try:  # optional: LoRA layers injected through peft
    from peft.tuners.lora.layer import LoraLayer
except ImportError:  # pragma: no cover - peft is optional for the modeling code
    LoraLayer = None


def is_adapter_module(module: nn.Module) -> bool:
    """A module refseg (or PEFT's LoRA) added to a backbone, initialised by the method model."""
    return isinstance(module, AdapterModule) or (LoraLayer is not None and isinstance(module, LoraLayer))


def reset_adapter_module(module: nn.Module) -> bool:
    """(Re)initialise `module` if it is an adapter module; returns whether it was one."""
    if isinstance(module, AdapterModule):
        module.reset_parameters()
        return True
    if LoraLayer is not None and isinstance(module, LoraLayer):
        for name in module.lora_A:
            module.reset_lora_parameters(name, True)
        return True
    return False


@torch.no_grad()
def initialize_weights_with_adapters(model: PreTrainedModel) -> None:
    """`model.initialize_weights()`, adapter-aware (see the module docstring).

    Modules are visited children first (as transformers does), so an adapter module's own
    `reset_parameters` runs after, and wins over, any generic init of its children.
    """

    def visit(module, fn, backbone_fn):
        for name, child in module.named_children():
            if isinstance(child, PreTrainedModel):
                visit(child, child._initialize_weights, child._initialize_weights)
            elif is_adapter_module(child):
                visit(child, model._initialize_weights, backbone_fn)
            elif name == "base_layer" and (isinstance(module, AdapterLayer) or is_adapter_module(module)):
                visit(child, backbone_fn, backbone_fn)  # the stock module inside a wrapper
            else:
                visit(child, fn, backbone_fn)
        # transformers' remote-code shortcut (skip modules whose direct tensors are all loaded) would
        # also skip modules without direct tensors, i.e. most adapters: not used here, the guard suffices.
        fn(module, False)

    with hf_init.guard_torch_init_functions():
        visit(model, model._initialize_weights, model._initialize_weights)


__all__ = ["initialize_weights_with_adapters", "is_adapter_module", "reset_adapter_module"]
