"""What a checkpoint holds besides its folder layout, and how it is read back.

- `method_weights.safetensors`: the method's own weights and buffers (adapters, heads, their
  BatchNorm statistics) — never the frozen pretrained backbone.
- `optimizer.pt`: the optimizer's state dict (`torch.save`; read with `weights_only=True`).
- `scheduler.json`: the learning-rate scheduler's plain-number state.
- `rng_state_<rank>.json` / `.safetensors`: Python, NumPy and torch generator states per process.
No file is unpickled beyond `torch.load(weights_only=True)`.

Under FSDP (`is_sharded`: the parameters are `DTensor` shards) the files are the same: every process
calls `gather_main_state` (the shards are gathered into whole tensors) and the main process writes them;
`load_state` has each process read the whole tensors and keep its own shard.

Reading is two-phase: `read_checkpoint_files` loads and checks every file first (a file that does
not read back raises `CorruptCheckpointError` naming it), and only then are the model, optimizer,
scheduler and generators changed, so a corrupt checkpoint leaves the run untouched.
`restore_checkpoint` adds the fallback of `--resume_from_checkpoint latest`: a corrupt newest
checkpoint is skipped, with a warning naming the file, for the previous complete one.
"""

import json
import logging
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:  # FSDP2 shards (torch >= 2.5 with distributed support); without them no model is sharded
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = distribute_tensor = None

from .checkpointing import CorruptCheckpointError, list_checkpoints, read_state, resolve_checkpoint, verify_checkpoint

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "method_weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"


def is_sharded(model) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (`DTensor`s): its checkpoint state must be gathered by
    every process (`gather_main_state`) and is scattered back on loading."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every process calls it, in the same order)."""
    return tensor.full_tensor() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` as `like` holds it: this process's shard when `like` is a `DTensor` (cut locally: every
    process read the same file), else `full` itself; a 0-d value for a parameter FSDP needed 1-d is reshaped."""
    if full.dim() == 0 and like.dim() == 1 and like.numel() == 1:
        full = full.reshape(1)
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def method_state_dict(model) -> dict:
    """The weights a checkpoint keeps: everything the method adds to its frozen backbones (whole tensors;
    for an FSDP-sharded model every process must call this, see `gather_main_state`)."""
    from .modeling import scalar_shapes_restored

    state = model.trainable_state_dict()
    return scalar_shapes_restored({k: _full(v).detach().contiguous().cpu() for k, v in state.items()}, model)


def optimizer_state_dict(optimizer, model) -> dict:
    """`optimizer.state_dict()` with whole tensors where the parameters are FSDP shards (a collective then),
    0-d where the parameter was (`prepare_scalars_for_fsdp`): the same file as an unsharded run writes."""
    from .modeling import FSDP_SCALARS

    scalars = getattr(model, FSDP_SCALARS, frozenset())
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    out = {}
    for index, entry in state["state"].items():
        scalar = names.get(id(params[int(index)])) in scalars
        out[index] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                value = _full(value).detach().cpu()
                value = value.reshape(()) if scalar and value.numel() == 1 else value
            out[index][name] = value
    state["state"] = out
    return state


def gather_main_state(model, optimizer) -> dict:
    """`{"weights", "optimizer"}`: the whole method weights and optimizer state of an FSDP-sharded model. Every
    process calls it (the shards are gathered); the main process writes the result (`write_main_state`)."""
    return {"weights": method_state_dict(model), "optimizer": optimizer_state_dict(optimizer, model)}


def write_main_state(directory, *, model, optimizer, scheduler, gathered: Optional[dict] = None):
    """Weights, optimizer and scheduler files; `gathered` (`gather_main_state`) where the model is sharded."""
    directory = Path(directory)
    gathered = gathered or {"weights": method_state_dict(model), "optimizer": optimizer.state_dict()}
    save_file(gathered["weights"], str(directory / WEIGHTS_FILE))
    torch.save(gathered["optimizer"], directory / OPTIMIZER_FILE)
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


# What a file that does not read back raises: safetensors' own error, torch's zip reader (RuntimeError),
# the restricted unpickler of `weights_only=True` (UnpicklingError), a cut-short file (EOFError), JSON.
_READ_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, ValueError, KeyError,
                TypeError, IndexError, UnicodeDecodeError)


def _read(path: Path, reader, check=None, expected: str = ""):
    try:
        value = reader(path)
    except _READ_ERRORS as err:
        raise CorruptCheckpointError(path, f"corrupt checkpoint file ({type(err).__name__}: {str(err)[:200]})") from err
    if check is not None and not check(value):
        raise CorruptCheckpointError(path, f"corrupt checkpoint file (expected {expected}, got {type(value).__name__})")
    return value


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_checkpoint_files(directory, *, rank: int) -> dict:
    """Every file `load_state` needs, read and checked; nothing is applied yet.

    Returns `{"weights", "optimizer", "scheduler", "rng_json", "rng_tensors"}` (the two RNG entries are
    `None` when this rank has no saved state). Raises `CorruptCheckpointError` naming the first file
    that is missing, truncated, or of the wrong structure.
    """
    directory = Path(directory)
    out = {
        "weights": _read(directory / WEIGHTS_FILE, lambda p: load_file(str(p))),
        "optimizer": _read(directory / OPTIMIZER_FILE,
                           lambda p: torch.load(p, map_location="cpu", weights_only=True),
                           lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(),
                           "an optimizer state dict"),
        "scheduler": _read(directory / SCHEDULER_FILE, _json, lambda v: isinstance(v, dict), "a JSON object"),
        "rng_json": None, "rng_tensors": None,
    }
    json_path = directory / f"rng_state_{rank}.json"
    if json_path.is_file():  # a run resumed on more processes than it was saved with has none
        out["rng_json"] = _read(json_path, _json, lambda v: isinstance(v, dict) and {"python", "numpy"} <= v.keys(),
                                "a JSON object with 'python' and 'numpy'")
        out["rng_tensors"] = _read(directory / f"rng_state_{rank}.safetensors", lambda p: load_file(str(p)),
                                   lambda v: "torch" in v, "a 'torch' generator state")
    return out


def load_state(directory, *, model, optimizer, scheduler, rank: int):
    """Restore weights, optimizer, scheduler and this process's RNG from a checkpoint folder.

    Raises `CorruptCheckpointError` (before changing anything) when a file does not read back.
    """
    files = read_checkpoint_files(directory, rank=rank)
    weights, optimizer_state = files["weights"], files["optimizer"]
    if is_sharded(model):  # FSDP: each process keeps its shard of the whole tensors it read
        current = model.trainable_state_dict()
        weights = {k: _shard_like(v, current[k]) if k in current else v for k, v in weights.items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer_state = {**optimizer_state, "state": {
            index: {name: _shard_like(value, params[int(index)]) if torch.is_tensor(value) and name != "step" else value
                    for name, value in entry.items()}
            for index, entry in optimizer_state["state"].items()}}
    model.load_trainable_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(files["scheduler"])
    if files["rng_json"] is not None:
        version, internal, gauss = files["rng_json"]["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = files["rng_json"]["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        tensors = files["rng_tensors"]
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)


def restore_checkpoint(resume_from: str, output_dir, *, model, optimizer, scheduler, rank: int
                       ) -> Optional[tuple]:
    """Resume from `resume_from` (`"latest"` or a checkpoint folder); returns `(folder, state)` or `None`.

    `"latest"` tries the complete checkpoints of `output_dir` newest first: one whose files fail
    `verify_checkpoint` (recorded SHA-256) or do not read back is skipped with a warning naming the
    file, and the previous one is used. `None` when there is no checkpoint at all (a fresh run). A
    folder named explicitly is never swapped for another: its corruption raises.

    Raises:
        CorruptCheckpointError: the named folder is corrupt, or every checkpoint in `output_dir` is
            (the message lists them; starting over silently would throw the run away).
    """
    if resume_from == "latest":
        candidates = list(reversed(list_checkpoints(output_dir)))
        if not candidates:
            return None
    else:
        candidates = [resolve_checkpoint(resume_from, output_dir)]
    skipped = []
    for folder in candidates:
        try:
            verify_checkpoint(folder)
            state = read_state(folder)
            load_state(folder, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        except CorruptCheckpointError as err:
            if resume_from != "latest":
                raise
            logger.warning("skipping %s: %s; falling back to the previous complete checkpoint", folder.name, err)
            skipped.append(str(err))
            continue
        if skipped:
            logger.warning("resuming from %s instead of the newest checkpoint (%d corrupt one(s) skipped)",
                           folder, len(skipped))
        return folder, state
    raise CorruptCheckpointError(Path(output_dir), "every checkpoint in this folder is corrupt, so there is nothing "
                                 "to resume from (delete them to start over): " + "; ".join(skipped))
