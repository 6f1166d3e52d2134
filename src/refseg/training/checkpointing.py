"""Crash-safe checkpoint folders: `<output_dir>/checkpoint-<step>/`.

A checkpoint is written into a hidden temporary folder and renamed into place only once every
file is on disk, so `checkpoint-<step>` exists only when complete: a crash mid-write leaves a
`.tmp-checkpoint-*` folder that `find_latest_checkpoint` never picks up (and the next save of
that step clears). Each checkpoint holds only what cannot be rebuilt from the pretrained
backbones: the method's own weights (adapters, heads, their buffers), the optimizer and
scheduler states, each process's RNG state and `trainer_state.json` (step, epoch, position).

Integrity: before the rename every file of the folder is flushed to disk (`fsync`, then the folder
itself), and `trainer_state.json` records the SHA-256 of every other file (`file_sha256`).
`verify_checkpoint` recomputes them, so a truncated or bit-flipped file is found before anything
is loaded (safetensors and `torch.save` files carry no checksum of their own); `read_state` returns
the caller's state without that key. Pruning renames a checkpoint to `.deleting-checkpoint-<step>`
before deleting it, so a crash mid-delete never leaves a `checkpoint-<step>` with files missing.

Test hook: `REFSEG_TEST_PAUSE_AT=<point>` (with `REFSEG_TEST_PAUSE_DIR=<folder>`) makes the process
write `<folder>/<point>` and sleep at that point, so a test can `kill -9` it exactly there. Points
here: `checkpoint-<step>:files` (files written into the temporary folder, no state file yet),
`checkpoint-<step>:state` (state written, not yet renamed), `prune:checkpoint-<step>` (that old
checkpoint renamed aside, not yet deleted); `scripts/train.py` adds `update-<n>:backward`. Unset, it
does nothing; nothing but tests sets it.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
CHECKSUM_KEY = "file_sha256"
PAUSE_ENV, PAUSE_DIR_ENV = "REFSEG_TEST_PAUSE_AT", "REFSEG_TEST_PAUSE_DIR"
PAUSE_SECONDS = 120  # a paused process carries on after this, so a broken test cannot hang forever


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files do not read back; `path` is the offending file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)


def pause_point(point: str) -> None:
    """Test hook (see the module docstring): pause here when `REFSEG_TEST_PAUSE_AT` names `point`."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker_dir = Path(os.environ.get(PAUSE_DIR_ENV, "."))
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / point).write_text(str(os.getpid()))
    logger.warning("test hook: paused at %s (pid %d)", point, os.getpid())
    time.sleep(PAUSE_SECONDS)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_aside(path: Path, prefix: str) -> Path:
    """Rename the folder `path` to `<prefix><name>` beside it (one atomic rename; a leftover of that name,
    from a crash, is deleted first) and return the new path, for the caller to delete."""
    aside = path.with_name(f"{prefix}{path.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    return aside


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
    for leftover in Path(output_dir).glob(".deleting-checkpoint-*"):  # a crash mid-delete left it
        shutil.rmtree(leftover)
    found = list_checkpoints(output_dir)
    removed = found[: max(len(found) - total_limit, 0)]
    for path in removed:
        doomed = _move_aside(path, ".deleting-")  # the checkpoint is either whole or gone from `list_checkpoints`
        pause_point(f"prune:{path.name}")
        shutil.rmtree(doomed)
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
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != STATE_FILE)
        for path in files:
            _fsync(path)
        pause_point(f"checkpoint-{step}:files")
        record = dict(state or {"global_step": step})
        record[CHECKSUM_KEY] = {path.name: file_sha256(path) for path in files}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        pause_point(f"checkpoint-{step}:state")
        stale = None
        if final.exists():  # the same step saved again: move the old copy aside (a rename), then delete it
            stale = _move_aside(final, ".stale-")
        os.replace(tmp, final)
        _fsync(output_dir)
        if stale is not None:
            shutil.rmtree(stale)
    wait()
    return final


def _read_record(checkpoint_dir) -> dict:
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(path, f"corrupt checkpoint file ({type(err).__name__}: {err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("global_step", 0), int):
        raise CorruptCheckpointError(path, "corrupt checkpoint file (expected a JSON object with an int "
                                           "'global_step')")
    return record


def read_state(checkpoint_dir) -> dict:
    """The state `save_checkpoint` was given (`trainer_state.json` without its checksums).

    Raises `CorruptCheckpointError` (a `ValueError` naming the file) when the file does not parse.
    """
    record = _read_record(checkpoint_dir)
    record.pop(CHECKSUM_KEY, None)
    return record


def verify_checkpoint(checkpoint_dir) -> None:
    """Check every file `trainer_state.json` lists against its recorded SHA-256.

    Raises `CorruptCheckpointError` naming the first file that is missing or differs (truncated,
    bit-flipped, replaced). Checkpoints written before checksums were recorded pass unchecked.
    """
    checkpoint_dir = Path(checkpoint_dir)
    sums = _read_record(checkpoint_dir).get(CHECKSUM_KEY, {})
    if not isinstance(sums, dict):
        raise CorruptCheckpointError(checkpoint_dir / STATE_FILE,
                                     f"corrupt checkpoint file ('{CHECKSUM_KEY}' is not a mapping)")
    for name, expected in sorted(sums.items()):
        path = checkpoint_dir / name
        if not path.is_file():
            raise CorruptCheckpointError(path, f"missing from its checkpoint (listed in {STATE_FILE})")
        if file_sha256(path) != expected:
            raise CorruptCheckpointError(path, "corrupt checkpoint file (its SHA-256 differs from the one recorded "
                                               f"in {STATE_FILE}: truncated or altered)")
