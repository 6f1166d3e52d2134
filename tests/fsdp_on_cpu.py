"""`python tests/fsdp_on_cpu.py scripts/train.py ARGS`: train.py under Accelerate's FSDP on CPU processes.

Used by tests/test_train_fsdp.py as the script `accelerate launch --config_file
scripts/configs/accelerate/fsdp.yaml` starts. Accelerate (1.16) takes FSDP only on accelerator devices:
on CPU its state becomes MULTI_CPU (DDP over gloo) whatever the config says. PyTorch's FSDP2
(`fully_shard`) itself runs on CPU over gloo, so this wrapper makes the one switch Accelerate makes on
GPUs (state MULTI_<device> + an FSDP plugin -> FSDP) for MULTI_CPU too, then runs the script unchanged:
`prepare`, `clip_grad_norm_`, `no_sync` and train.py's checkpointing all take their FSDP paths.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))  # as `python script.py` would
    runpy.run_path(sys.argv[0], run_name="__main__")
