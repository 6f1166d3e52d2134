"""Reliability of training: `kill -9` at chosen moments, corrupted checkpoint files, `latest` with nothing
to resume.

The kill test runs `scripts/train.py` with one and the same command every time (`--resume_from_checkpoint
latest`, as a job scheduler restarts a job) and kills it with SIGKILL where the test hook
`REFSEG_TEST_PAUSE_AT` holds it (`refseg.training.checkpointing.pause_point`): in the middle of an update
and while a checkpoint's files are being written (a crash while one is pruned, and at the other write
point, are simulated in-process below: each extra run of the script costs about 20 s). The last restart
also finds its newest complete checkpoint bit-flipped and must fall back to the previous one. The final
trainable weights must equal those of an uninterrupted run, bit for bit.

The corruption tests call `refseg.training.resume.restore_checkpoint` in-process on a tiny module.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_script import REPO, TRAIN, _common_args, _final_method_weights
from test_training_resume import build, train_steps

from refseg.training.checkpointing import (
    STATE_FILE,
    CorruptCheckpointError,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from refseg.training.resume import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    WEIGHTS_FILE,
    restore_checkpoint,
    write_main_state,
    write_rng_state,
)

FRESH_RUN = "starting a new training run"


def _launch(cmd, log_path, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log


def run_to_end(cmd, log_path, timeout=240):
    proc, log = _launch(cmd, log_path)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = Path(log_path).read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text[-6000:]}"
    return text


def kill_at(cmd, point, marker_dir, log_path, timeout=240):
    """Start `cmd`, wait until the hook holds it at `point`, `kill -9` it; returns what it printed."""
    proc, log = _launch(cmd, log_path, {"REFSEG_TEST_PAUSE_AT": point, "REFSEG_TEST_PAUSE_DIR": str(marker_dir)})
    marker = Path(marker_dir) / point
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"train.py ended (exit {proc.returncode}) before reaching {point}\n"
                            f"{Path(log_path).read_text()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"train.py did not reach {point} within {timeout} s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()
    return Path(log_path).read_text()


def flip_a_bit(path, offset_from_end=64):
    data = bytearray(Path(path).read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    Path(path).write_bytes(bytes(data))


def names(output_dir):
    return [p.name for p in list_checkpoints(output_dir)]


@pytest.mark.slow
def test_kill_9_at_any_moment_then_latest_resumes_to_the_uninterrupted_weights(tiny_backbones, refshapes_root,
                                                                                tmp_path):
    def command(out):
        return [sys.executable, str(TRAIN), *_common_args(
            tiny_backbones, refshapes_root, out, checkpointing_steps=2, checkpoints_total_limit=2,
            eval_splits="", resume_from_checkpoint="latest")]

    # Uninterrupted, with `latest` in an empty folder: a fresh run that says so (item 6).
    log = run_to_end(command(tmp_path / "whole"), tmp_path / "whole.log")
    assert FRESH_RUN in log
    expected = _final_method_weights(tmp_path / "whole")

    out, markers = tmp_path / "run", tmp_path / "markers"
    cmd = command(out)
    # 1. mid-update 3 (after backward, before the optimizer step): checkpoint-2 is the one left.
    log = kill_at(cmd, "update-3:backward", markers, tmp_path / "1.log")
    assert FRESH_RUN in log and names(out) == ["checkpoint-2"]
    # 2. while checkpoint-6's files are being written: only a hidden temporary folder, never picked up.
    log = kill_at(cmd, "checkpoint-6:files", markers, tmp_path / "2.log")
    assert f"{out / 'checkpoint-2'} at step 2" in log
    assert names(out) == ["checkpoint-2", "checkpoint-4"]
    tmp = out / ".tmp-checkpoint-6"
    assert (tmp / WEIGHTS_FILE).is_file() and not (tmp / STATE_FILE).exists()
    # 3. the newest complete checkpoint damaged on disk: a logged fallback to checkpoint-2, not to the
    # half-written 6; steps 3-6 are trained again. (A kill mid-pruning: the in-process test below.)
    flip_a_bit(out / "checkpoint-4" / WEIGHTS_FILE)
    log = run_to_end(cmd, tmp_path / "3.log")
    assert f"{out / 'checkpoint-4' / WEIGHTS_FILE}: corrupt checkpoint file" in log
    assert "falling back to the previous complete checkpoint" in log
    assert f"{out / 'checkpoint-2'} at step 2" in log
    assert names(out) == ["checkpoint-4", "checkpoint-6"]

    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftovers of the kills remain"
    resumed = _final_method_weights(out)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


# ------------------------------------------------------------------ corrupted checkpoint files (in-process)


def _checkpoint(output_dir, step, model, optimizer, scheduler):
    def write(folder):
        write_main_state(folder, model=model, optimizer=optimizer, scheduler=scheduler)
        write_rng_state(folder, 0)

    return save_checkpoint(output_dir, step, write, state={"global_step": step})


@pytest.fixture
def two_checkpoints(tmp_path):
    """`(output_dir, weights at step 2, weights at step 4)` of a tiny module trained 4 steps."""
    model, optimizer, scheduler = build(0)
    at = {}
    for step in (2, 4):
        train_steps(model, optimizer, scheduler, 2)
        _checkpoint(tmp_path, step, model, optimizer, scheduler)
        at[step] = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    return tmp_path, at[2], at[4]


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def wrong_type_json(path):
    Path(path).write_text(json.dumps(["not", "an", "object"]))


DAMAGE = {
    "truncated weights": (WEIGHTS_FILE, truncate),
    "bit-flipped weights": (WEIGHTS_FILE, flip_a_bit),
    "truncated optimizer": (OPTIMIZER_FILE, truncate),
    "bit-flipped optimizer": (OPTIMIZER_FILE, flip_a_bit),
    "scheduler of the wrong type": (SCHEDULER_FILE, wrong_type_json),
    "trainer state of the wrong type": (STATE_FILE, wrong_type_json),
    "missing optimizer": (OPTIMIZER_FILE, lambda p: Path(p).unlink()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(two_checkpoints, damage, caplog):
    output_dir, at_2, at_4 = two_checkpoints
    name, spoil = DAMAGE[damage]
    spoil(output_dir / "checkpoint-4" / name)
    model, optimizer, scheduler = build(1)
    with caplog.at_level("WARNING", logger="refseg.training.resume"):
        folder, state = restore_checkpoint("latest", output_dir, model=model, optimizer=optimizer,
                                           scheduler=scheduler, rank=0)
    assert folder == output_dir / "checkpoint-2" and state == {"global_step": 2}
    assert scheduler.last_epoch == 2
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, at_2[key]), key
    assert str(output_dir / "checkpoint-4" / name) in caplog.text and "falling back" in caplog.text


@pytest.mark.parametrize("damage", ["truncated weights", "bit-flipped optimizer"])
def test_a_damaged_checkpoint_named_explicitly_raises_naming_the_file_and_changes_nothing(two_checkpoints, damage):
    output_dir, _, _ = two_checkpoints
    name, spoil = DAMAGE[damage]
    spoil(output_dir / "checkpoint-4" / name)
    model, optimizer, scheduler = build(1)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match=str(output_dir / "checkpoint-4" / name).replace("+", r"\+")):
        restore_checkpoint(str(output_dir / "checkpoint-4"), output_dir, model=model, optimizer=optimizer,
                           scheduler=scheduler, rank=0)
    assert scheduler.last_epoch == 0
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_intact_newest_checkpoint_is_used_and_every_one_corrupt_raises(two_checkpoints):
    output_dir, _, at_4 = two_checkpoints
    model, optimizer, scheduler = build(1)
    folder, _ = restore_checkpoint("latest", output_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                   rank=0)
    assert folder == output_dir / "checkpoint-4"
    assert all(torch.equal(v, at_4[k]) for k, v in model.trainable_state_dict().items())
    for step in (2, 4):
        truncate(output_dir / f"checkpoint-{step}" / WEIGHTS_FILE)
    with pytest.raises(CorruptCheckpointError, match="every checkpoint in this folder is corrupt"):
        restore_checkpoint("latest", output_dir, model=model, optimizer=optimizer, scheduler=scheduler, rank=0)


def test_a_checkpoint_without_recorded_checksums_is_still_read_through_its_checks(two_checkpoints):
    """Checkpoints written before checksums were recorded: a truncated file still fails to read back."""
    output_dir, at_2, _ = two_checkpoints
    for step in (2, 4):
        state_file = output_dir / f"checkpoint-{step}" / STATE_FILE
        state_file.write_text(json.dumps({"global_step": step}))
    truncate(output_dir / "checkpoint-4" / OPTIMIZER_FILE)
    model, optimizer, scheduler = build(1)
    folder, _ = restore_checkpoint("latest", output_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                   rank=0)
    assert folder == output_dir / "checkpoint-2"


def test_latest_in_an_empty_or_missing_folder_is_a_fresh_start(tmp_path):
    model, optimizer, scheduler = build(0)
    for folder in (tmp_path, tmp_path / "not-yet-created"):
        assert restore_checkpoint("latest", folder, model=model, optimizer=optimizer, scheduler=scheduler,
                                  rank=0) is None


def test_pruning_renames_a_checkpoint_aside_before_deleting_it(tmp_path, monkeypatch):
    """A crash mid-delete leaves no `checkpoint-<step>` folder with files missing."""
    from refseg.training import checkpointing

    for step in (1, 2):
        save_checkpoint(tmp_path, step, lambda d: (d / "w").write_text("x" * 100))
    seen = []

    def crash(path, *args, **kwargs):
        seen.append(Path(path).name)
        raise OSError("killed mid-delete")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", crash)
    with pytest.raises(OSError, match="mid-delete"):
        prune_checkpoints(tmp_path, 1)
    assert seen == [".deleting-checkpoint-1"] and names(tmp_path) == ["checkpoint-2"]
    monkeypatch.undo()
    prune_checkpoints(tmp_path, 1)  # the next pruning clears the leftover
    assert names(tmp_path) == ["checkpoint-2"] and not (tmp_path / ".deleting-checkpoint-1").exists()


def test_a_model_folder_whose_config_has_a_wrong_type_stops_train_py_naming_the_file(tiny_trained_risclip,
                                                                                     tmp_path):
    import shutil

    import train

    folder = tmp_path / "model"
    shutil.copytree(tiny_trained_risclip[2], folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_size"] = "sixty-four"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json") as info:
        train.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")])
    assert str(folder / "config.json") in str(info.value) and "image_size" in str(info.value)
    (folder / "config.json").write_text('{"model_type": "risclip", "image_size": ')  # cut short
    with pytest.raises(ValueError, match="config.json"):
        train.check_model_config(folder)


@pytest.mark.parametrize("point", ["files", "state"])
def test_a_crash_at_either_write_point_leaves_only_the_previous_checkpoint_visible(tmp_path, monkeypatch, point):
    """The in-process twin of the kill test, for both pause points of `save_checkpoint`."""
    from refseg.training import checkpointing

    save_checkpoint(tmp_path, 1, lambda d: (d / WEIGHTS_FILE).write_text("1"))

    def crash_at(name):
        if name == f"checkpoint-2:{point}":
            raise KeyboardInterrupt  # what SIGKILL does to the process, minus the process

    monkeypatch.setattr(checkpointing, "pause_point", crash_at)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, lambda d: (d / WEIGHTS_FILE).write_text("2"))
    assert names(tmp_path) == ["checkpoint-1"]
    assert (tmp_path / ".tmp-checkpoint-2" / STATE_FILE).exists() == (point == "state")


def test_the_pause_hook_does_nothing_unless_its_point_is_named(tmp_path, monkeypatch):
    from refseg.training import checkpointing

    monkeypatch.setattr(checkpointing, "PAUSE_SECONDS", 0)
    monkeypatch.delenv("REFSEG_TEST_PAUSE_AT", raising=False)
    monkeypatch.setenv("REFSEG_TEST_PAUSE_DIR", str(tmp_path))
    checkpointing.pause_point("update-1:backward")
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("REFSEG_TEST_PAUSE_AT", "update-1:backward")
    checkpointing.pause_point("update-2:backward")
    assert not list(tmp_path.iterdir())
    checkpointing.pause_point("update-1:backward")
    assert (tmp_path / "update-1:backward").read_text() == str(os.getpid())
