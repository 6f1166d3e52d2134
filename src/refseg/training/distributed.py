"""BatchNorm synchronised across training processes (`scripts/train.py --sync_batch_norm`).

With several processes each BatchNorm normally normalises by the statistics of its own process's
micro-batch (8 samples per GPU for CRIS's global 64 on 8 GPUs). The authors of CRIS convert their model
with `nn.SyncBatchNorm` so that every BatchNorm sees the statistics of the whole global batch.
`convert_sync_batch_norm` does the same for any refseg model: on CUDA with PyTorch's `nn.SyncBatchNorm`;
elsewhere (CPU processes with gloo, where PyTorch's `SyncBatchNorm` refuses to run and DDP refuses to wrap
it) with `RefsegSyncBatchNorm`, which computes the global statistics with one differentiable all-reduce of
(sum, sum of squares, count), so multi-process CPU runs (and their tests) synchronise too.
"""

import logging

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


class RefsegSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batches of every process (see the module docstring), for any device; outside
    training, or with one process, plain BatchNorm. Not an `nn.SyncBatchNorm` (DDP refuses those on CPU).

    The variance is E[x^2] - E[x]^2 of the global batch (clamped at 0), the biased one normalises and the
    unbiased one updates `running_var`, as BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = torch.full((1,), input.numel() / channels, dtype=input.dtype, device=input.device)
        local = torch.cat([input.sum(dims), (input * input).sum(dims), count])
        from torch.distributed.nn.functional import all_reduce

        total = all_reduce(local, group=group)  # differentiable: gradients flow to every process's samples
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, channels) + (1,) * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batch_norm(model: nn.Module, device_type: str = "cpu", process_group=None) -> int:
    """Replace every `BatchNorm1d/2d/3d` inside `model` (in place) by a synchronised one holding the same
    parameters (the same `Parameter` objects, so optimizer groups built before stay valid) and buffers:
    PyTorch's `nn.SyncBatchNorm` where `device_type` is `"cuda"`, `RefsegSyncBatchNorm` elsewhere.
    State-dict keys do not change: checkpoints and `save_pretrained` folders load into the plain model.
    Returns the number of layers converted."""
    layer_class = nn.SyncBatchNorm if device_type == "cuda" else RefsegSyncBatchNorm
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, (nn.SyncBatchNorm, RefsegSyncBatchNorm)):
                sync = layer_class(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats, process_group,
                                           device=child.running_mean.device if child.running_mean is not None else None,
                                           dtype=child.running_mean.dtype if child.running_mean is not None else None)
                if child.affine:
                    sync.weight, sync.bias = child.weight, child.bias
                if child.track_running_stats:
                    sync.running_mean, sync.running_var = child.running_mean, child.running_var
                    sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(parent, name, sync)
                converted += 1
    return converted


__all__ = ["RefsegSyncBatchNorm", "convert_sync_batch_norm"]
