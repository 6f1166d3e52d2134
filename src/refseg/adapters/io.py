"""Adapter weights on disk: exactly `adapter_config.json` + `adapter_model.safetensors`, as PEFT.

`adapter_state_dict` gathers what a trained adapter adds to a frozen backbone: the parameters
held by adapter wrappers (found by walking them) plus the full state (parameters and buffers) of
the submodules named in `modules_to_save` (task heads, fusion blocks). Keys are the names in the
model the adapter was injected into, so they load back into a model built the same way.
"""

import logging
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ADAPTER_CONFIG_NAME, AdapterConfig
from .injection import adapter_named_parameters, inject_adapter

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module, modules_to_save=()) -> dict:
    """`{name: tensor}` of every adapter parameter and of every tensor of `modules_to_save`.

    Args:
        model: a model with injected adapters (and/or heads).
        modules_to_save: names of submodules of `model` saved whole (parameters and persistent buffers).

    Returns:
        `dict[str, torch.Tensor]`, detached; names as in `model.state_dict()`.
    """
    state = {name: param.detach() for name, param in adapter_named_parameters(model)}
    for module_name in modules_to_save or ():
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise ValueError(f"`modules_to_save` names {module_name!r}, which is not a submodule of the model") from err
        for key, tensor in module.state_dict().items():
            state[f"{module_name}.{key}"] = tensor.detach()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict, modules_to_save=()) -> None:
    """Copy `state` (from `adapter_state_dict`) into `model` in place.

    Raises `ValueError` when `state` misses an adapter tensor of the model or holds one the model
    lacks, or when a shape differs, so a partial or foreign checkpoint never loads silently.
    """
    expected = adapter_state_dict(model, modules_to_save)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter `state` does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            value = state[name]
            if value.shape != target.shape:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def save_adapter(
    model: nn.Module, save_directory, config: Optional[AdapterConfig] = None, adapter_name: str = "default"
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` into `save_directory`.

    `config` defaults to the one `inject_adapter` stored on the model for `adapter_name`; its
    `modules_to_save` decides which heads go into the weights file.
    """
    if config is None:
        configs = getattr(model, "refseg_adapter_config", None) or {}
        if adapter_name not in configs:
            raise ValueError(f"the model has no adapter {adapter_name!r} and no `config` was given")
        config = configs[adapter_name]
    state = adapter_state_dict(model, config.modules_to_save)
    if not state:
        raise ValueError("the model holds no adapter weights to save")
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME))
    logger.info("saved %d adapter tensors to %s", len(state), save_directory)


def load_adapter(
    model: nn.Module, load_directory, adapter_name: str = "default", *, inject: bool = True
) -> AdapterConfig:
    """Load an adapter folder into `model`; returns its config.

    With `inject=True` the adapter is injected first when `model` does not carry it yet (a stock
    backbone becomes the adapted one); with `inject=False` the model must already hold matching
    adapter layers (a refseg model builds its own). Raises `ValueError` for a folder without both
    files or weights that do not match.
    """
    weights = os.path.join(load_directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise ValueError(f"`load_directory` {load_directory!s} holds no {ADAPTER_WEIGHTS_NAME}")
    config = AdapterConfig.from_pretrained(load_directory)
    configs = getattr(model, "refseg_adapter_config", None) or {}
    if inject and adapter_name not in configs:
        inject_adapter(model, config, adapter_name)
    load_adapter_state_dict(model, load_file(weights), config.modules_to_save)
    return config


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "adapter_state_dict",
    "load_adapter",
    "load_adapter_state_dict",
    "save_adapter",
]
