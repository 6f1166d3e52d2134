"""Inject adapters into a stock model by module name, walk them, and take them out again.

The routine is PEFT's: find the targets by name, build the wrapper for each, swap it in with
`setattr` on the parent. `unload` swaps the untouched stock modules back (refseg wrappers and
PEFT tuner layers such as LoRA alike). Trainable parameters are found by walking the adapter
layers, never by matching parameter-name prefixes.
"""

import logging
from typing import Iterator

from torch import nn

from .config import AdapterConfig, BottleneckAdapterConfig, module_matches
from .layers import AdaptedEncoderLayer, AdapterLayer

logger = logging.getLogger(__name__)

try:  # optional: PEFT tuner layers (LoRA) are walked and unloaded like refseg's own wrappers
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover - peft is a dependency, but the modeling code must not need it
    BaseTunerLayer = None

_WRAPPERS = {BottleneckAdapterConfig: AdaptedEncoderLayer}


def register_adapter_wrapper(config_cls: type, wrapper_cls: type) -> None:
    """Make `inject_adapter` wrap target modules in `wrapper_cls(base_layer)` for configs of type `config_cls`
    (each adapter kind registers its own wrapper where it is defined, as `refseg.adapters.prompts` does)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, AdapterConfig)):
        raise ValueError(f"`config_cls` must be an AdapterConfig subclass, got {config_cls!r}")
    if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, AdapterLayer)):
        raise ValueError(f"`wrapper_cls` must be an AdapterLayer subclass, got {wrapper_cls!r}")
    _WRAPPERS[config_cls] = wrapper_cls


def _is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer) or (BaseTunerLayer is not None and isinstance(module, BaseTunerLayer))


def _parent_and_child(model: nn.Module, name: str):
    parent_name, _, child_name = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child_name


def inject_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> list:
    """Wrap every module of `model` that `config.target_modules` names; returns the wrapped names.

    A target already wrapped gets `adapter_name` added to its wrapper instead. The config is kept
    in `model.refseg_adapter_config[adapter_name]` for `save_adapter`. Raises `ValueError` if the
    config names no module of `model`.
    """
    wrapper_cls = _WRAPPERS.get(type(config))
    if wrapper_cls is None:
        raise ValueError(f"`config` must be one of {[c.__name__ for c in _WRAPPERS]}, got {type(config).__name__}")
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.endswith(".base_layer") or ".base_layer." in name:
            continue  # the stock modules inside wrappers are never targets themselves
        if not name or not module_matches(name, config.target_modules):
            continue
        if isinstance(module, wrapper_cls):
            module.update_layer(adapter_name, config)
        else:
            wrapper = wrapper_cls(module, name=name)
            wrapper.update_layer(adapter_name, config)
            parent, child_name = _parent_and_child(model, name)
            setattr(parent, child_name, wrapper)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"`config.target_modules` ({config.target_modules!r}) matched no module of the model")
    configs = getattr(model, "refseg_adapter_config", None) or {}
    configs[adapter_name] = config
    model.refseg_adapter_config = configs
    logger.info("injected %s adapter %r into %d modules", config.adapter_type, adapter_name, len(wrapped))
    return wrapped


def adapter_layers(model: nn.Module) -> Iterator:
    """`(name, wrapper)` for every adapter wrapper in `model` (refseg's and PEFT's; a LoRA layer inside
    a refseg wrapper's `base_layer` is listed too)."""
    for name, module in model.named_modules():
        if _is_tuner_layer(module):
            yield name, module


def adapter_named_parameters(model: nn.Module) -> Iterator:
    """`(name, parameter)` of every adapter parameter, found by walking the adapter layers.

    Only what the wrappers hold in their `adapter_layer_names` containers is returned; the wrapped
    stock `base_layer` is never included.
    """
    seen = set()
    for layer_name, layer in adapter_layers(model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is None:
                continue
            for pname, param in container.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{layer_name}.{attr}.{pname}", param


def adapter_parameters(model: nn.Module) -> list:
    """The adapter parameters of `model` (see `adapter_named_parameters`)."""
    return [p for _, p in adapter_named_parameters(model)]


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """`requires_grad=False` everywhere, then `True` on the adapter parameters."""
    model.requires_grad_(False)
    for param in adapter_parameters(model):
        param.requires_grad_(True)


def unload(model: nn.Module) -> nn.Module:
    """Swap every adapter wrapper for the stock module it wraps; returns `model` (changed in place).

    The returned modules are the very objects that were wrapped, with their weights untouched.
    """
    names = [name for name, _ in adapter_layers(model)]
    # deepest first, so a wrapper inside another wrapper's base_layer is unwrapped before its parent
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        parent, child_name = _parent_and_child(model, name)
        wrapper = getattr(parent, child_name)
        setattr(parent, child_name, wrapper.get_base_layer())
    if hasattr(model, "refseg_adapter_config"):
        del model.refseg_adapter_config
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


__all__ = [
    "adapter_layers",
    "adapter_named_parameters",
    "adapter_parameters",
    "inject_adapter",
    "mark_only_adapters_trainable",
    "unload",
]
