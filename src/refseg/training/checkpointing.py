"""Crash-safe checkpoint folders: `<output_dir>/checkpoint-<step>/`.

A checkpoint is written into a hidden temporary folder and renamed into place only once every
file is on disk, so `checkpoint-<step>` exists only when complete: a crash mid-write leaves a
`.tmp-checkpoint-*` folder that `find_latest_checkpoint` never picks up (and the next save of
that step clears). Each checkpoint holds only what cannot be rebuilt from the pretrained
backbones: the method's own weights (adapters, heads, their buffers), the optimizer and
scheduler states, each process's RNG state and `trainer_state.json` (step, epoch, position).
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir) -> list:
    """Complete checkpoint folders in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint with the highest step, or `None`."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(resume_from: str, output_dir) -> Optional[Path]:
    """`"latest"` -> newest complete checkpoint in `output_dir` (or None); else the given folder."""
    if resume_from == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"`resume_from_checkpoint` {path} is not a complete checkpoint folder "
                         f"(no {STATE_FILE})")
    return path


def prune_checkpoints(output_dir, total_limit: Optional[int]) -> list:
    """Delete the oldest checkpoints so at most `total_limit` remain; returns what was removed."""
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"`checkpoints_total_limit` must be >= 1, got {total_limit}")
    found = list_checkpoints(output_dir)
    removed = found[: max(len(found) - total_limit, 0)]
    for path in removed:
        shutil.rmtree(path)
        logger.info("removed old checkpoint %s", path)
    return removed


def temporary_checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f".tmp-checkpoint-{step}"


def save_checkpoint(output_dir, step: int, write_files: Callable[[Path], None], *,
                    is_main_process: bool = True, wait: Callable[[], None] = lambda: None,
                    state: Optional[dict] = None) -> Path:
    """Write `checkpoint-<step>` atomically.

    Every process calls this; `write_files(tmp_dir)` writes that process's files (weights on the
    main process, its own RNG state on every process). The main process then writes
    `trainer_state.json` last and renames the folder into place. `wait` is the barrier
    (`accelerator.wait_for_everyone`).
    """
    output_dir = Path(output_dir)
    tmp = temporary_checkpoint_dir(output_dir, step)
    final = output_dir / f"checkpoint-{step}"
    if is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an earlier crash
        tmp.mkdir(parents=True)
    wait()
    write_files(tmp)
    wait()
    if is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state or {"global_step": step}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        stale = None
        if final.exists():  # the same step saved again: move the old copy aside (a rename), then delete it
            stale = output_dir / f".stale-checkpoint-{step}"
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
        os.replace(tmp, final)
        if stale is not None:
            shutil.rmtree(stale)
    wait()
    return final


def read_state(checkpoint_dir) -> dict:
    with open(Path(checkpoint_dir) / STATE_FILE) as f:
        return json.load(f)
