"""The optimizer and the batch arithmetic of a training run."""

import logging
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


def _implementation_kwargs(implementation: str, params: list) -> dict:
    """Keyword arguments selecting PyTorch's Adam(W) implementation.

    Adapters are many small tensors: the default on CPU is the per-tensor loop
    (`_single_tensor_adam`), whose Python overhead is a visible share of a tiny model's step.
    `"auto"` takes the fused kernel when every parameter is a floating-point tensor on CPU or
    CUDA (PyTorch has fused Adam(W) for both), else the multi-tensor (`foreach`) one.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`optimizer_implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        implementation = "fused" if fusable else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for-loop": {"foreach": False, "fused": False}}[implementation]


def build_optimizer(params: Iterable, *, optimizer: str = "adamw", learning_rate: float, weight_decay: float = 0.0,
                    betas: tuple = (0.9, 0.999), eps: float = 1e-8, implementation: str = "auto"):
    """Adam or AdamW over `params` (tensors or parameter-group dicts).

    Args:
        optimizer: `"adamw"` or `"adam"`.
        implementation: `"auto"` (fused where supported, else foreach), `"fused"`, `"foreach"` or
            `"for-loop"` (PyTorch's per-tensor loop, the CPU default before).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return OPTIMIZERS[optimizer](params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps,
                                 **_implementation_kwargs(implementation, tensors))


def resolve_gradient_accumulation(global_batch_size: Optional[int], per_device_batch_size: int,
                                  num_processes: int, gradient_accumulation_steps: int = 1) -> int:
    """Gradient accumulation steps that make `per_device x processes x accumulation = global_batch_size`.

    With `global_batch_size=None` the given `gradient_accumulation_steps` is returned unchanged (the
    global batch is then whatever the product is). Otherwise the accumulation is derived from the
    global batch; a `ValueError` names the arguments when the global batch is not a multiple of
    `per_device_batch_size x num_processes`, or when an explicit accumulation other than 1 disagrees.
    """
    for name, value in (("per_device_train_batch_size", per_device_batch_size), ("num_processes", num_processes),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")
    if global_batch_size is None:
        return gradient_accumulation_steps
    if global_batch_size < 1:
        raise ValueError(f"`global_batch_size` must be >= 1, got {global_batch_size}")
    per_update = per_device_batch_size * num_processes
    accumulation, remainder = divmod(global_batch_size, per_update)
    if remainder or accumulation < 1:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} is not a multiple of `per_device_train_batch_size` "
            f"{per_device_batch_size} x {num_processes} process(es) = {per_update}; choose a per-device batch "
            f"size whose product with the process count divides {global_batch_size}"
        )
    if gradient_accumulation_steps not in (1, accumulation):
        raise ValueError(
            f"`gradient_accumulation_steps` {gradient_accumulation_steps} contradicts `global_batch_size` "
            f"{global_batch_size} = {per_device_batch_size} x {num_processes} x {accumulation}; give one of the two"
        )
    return accumulation


__all__ = ["IMPLEMENTATIONS", "OPTIMIZERS", "build_optimizer", "resolve_gradient_accumulation"]
