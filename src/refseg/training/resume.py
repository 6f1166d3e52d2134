"""What a checkpoint holds besides its folder layout, and how it is read back.

- `method_weights.safetensors`: the method's own weights and buffers (adapters, heads, their
  BatchNorm statistics) — never the frozen pretrained backbone.
- `optimizer.pt`: the optimizer's state dict (`torch.save`; read with `weights_only=True`).
- `scheduler.json`: the learning-rate scheduler's plain-number state.
- `rng_state_<rank>.json` / `.safetensors`: Python, NumPy and torch generator states per process.
No file is unpickled beyond `torch.load(weights_only=True)`.
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "method_weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"


def method_state_dict(model) -> dict:
    """The weights a checkpoint keeps: everything the method adds to its frozen backbones."""
    state = model.trainable_state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_main_state(directory, *, model, optimizer, scheduler):
    directory = Path(directory)
    save_file(method_state_dict(model), str(directory / WEIGHTS_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    # LambdaLR stores `None` for plain-function lambdas: the state is plain numbers throughout.
    (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))


def write_rng_state(directory, rank: int):
    directory = Path(directory)
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    (directory / f"rng_state_{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x)
                                                       for x in np_state[2:]]],
    }))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"))


def load_state(directory, *, model, optimizer, scheduler, rank: int):
    """Restore weights, optimizer, scheduler and this process's RNG from a checkpoint folder."""
    directory = Path(directory)
    model.load_trainable_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(json.loads((directory / SCHEDULER_FILE).read_text()))
    json_path = directory / f"rng_state_{rank}.json"
    if json_path.is_file():  # a run resumed on more processes than it was saved with has none
        rng = json.loads(json_path.read_text())
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        tensors = load_file(str(directory / f"rng_state_{rank}.safetensors"))
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
