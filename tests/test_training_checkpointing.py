"""Unit tests of `refseg.training.checkpointing`: listing, `latest`, pruning, resolution and the
atomic save, with the half-written folders a crash leaves behind.

A checkpoint is complete when its folder is named `checkpoint-<step>` *and* holds
`trainer_state.json` (written last, then the folder is renamed into place). Anything else — a
`checkpoint-<step>` folder without the state file, a `.tmp-checkpoint-<step>` folder, a file of that
name — must be invisible to `latest`, to `resolve_checkpoint` and to the pruning count.
"""

import json
import threading
import time

import pytest

from refseg.training.checkpointing import (
    STATE_FILE,
    find_latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    temporary_checkpoint_dir,
)


def complete(output_dir, step):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "method_weights.safetensors").write_bytes(b"w")
    (folder / STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def half_written(output_dir, step):
    """What a crash (or a copy interrupted by hand) can leave: the weights but no state file."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "method_weights.safetensors").write_bytes(b"w")
    return folder


@pytest.fixture
def run_dir(tmp_path):
    """Complete checkpoints 2, 9, 10 (10 > 9 numerically, not as text) plus every kind of decoy,
    each with a higher step than any complete one."""
    out = tmp_path / "run"
    for step in (10, 2, 9):
        complete(out, step)
    half_written(out, 20)
    tmp = temporary_checkpoint_dir(out, 30)
    tmp.mkdir()
    (tmp / STATE_FILE).write_text("{}")  # complete content, but never renamed into place
    (out / "checkpoint-40").write_text("a file, not a folder")
    (out / "checkpoint-final").mkdir()
    (out / "checkpoint-final" / STATE_FILE).write_text("{}")
    return out


def names(paths):
    return [p.name for p in paths]


def test_only_complete_checkpoints_are_listed_oldest_first(run_dir):
    assert names(list_checkpoints(run_dir)) == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]


def test_latest_is_the_highest_complete_step_not_a_half_written_one(run_dir):
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoint-10"


def test_latest_of_a_missing_or_empty_or_only_half_written_dir_is_none(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    half_written(tmp_path, 5)
    assert find_latest_checkpoint(tmp_path) is None
    assert resolve_checkpoint("latest", tmp_path) is None


def test_pruning_counts_and_removes_complete_checkpoints_only(run_dir):
    removed = prune_checkpoints(run_dir, 2)
    assert names(removed) == ["checkpoint-2"]
    assert names(list_checkpoints(run_dir)) == ["checkpoint-9", "checkpoint-10"]
    assert (run_dir / "checkpoint-20").is_dir() and temporary_checkpoint_dir(run_dir, 30).is_dir()
    assert prune_checkpoints(run_dir, 2) == []
    assert names(prune_checkpoints(run_dir, 1)) == ["checkpoint-9"]
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoint-10"


def test_pruning_without_a_limit_keeps_everything_and_a_limit_below_one_is_refused(run_dir):
    assert prune_checkpoints(run_dir, None) == []
    assert len(list_checkpoints(run_dir)) == 3
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        prune_checkpoints(run_dir, 0)
    assert len(list_checkpoints(run_dir)) == 3


def test_resolve_latest_and_explicit_folders(run_dir):
    assert resolve_checkpoint("latest", run_dir) == run_dir / "checkpoint-10"
    assert resolve_checkpoint(str(run_dir / "checkpoint-9"), run_dir) == run_dir / "checkpoint-9"
    for bad in (run_dir / "checkpoint-20", temporary_checkpoint_dir(run_dir, 99), run_dir / "nowhere"):
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            resolve_checkpoint(str(bad), run_dir)


def test_save_writes_files_and_state_then_renames_into_place(tmp_path):
    seen = {}

    def write(folder):
        seen["folder"] = folder
        assert not (tmp_path / "checkpoint-7").exists(), "the final name must appear only once complete"
        (folder / "method_weights.safetensors").write_bytes(b"weights")

    final = save_checkpoint(tmp_path, 7, write, state={"global_step": 7, "epoch": 1, "position": 3})
    assert final == tmp_path / "checkpoint-7"
    assert seen["folder"] == temporary_checkpoint_dir(tmp_path, 7)
    assert not seen["folder"].exists()
    assert (final / "method_weights.safetensors").read_bytes() == b"weights"
    assert read_state(final) == {"global_step": 7, "epoch": 1, "position": 3}
    assert read_state(save_checkpoint(tmp_path, 8, lambda d: None)) == {"global_step": 8}
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-8"


def test_a_crash_mid_save_leaves_the_previous_checkpoint_latest_and_the_retry_starts_clean(tmp_path):
    save_checkpoint(tmp_path, 1, lambda d: (d / "a").write_text("1"))

    def crash(folder):
        (folder / "stale").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, crash)
    assert not (tmp_path / "checkpoint-2").exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"
    assert names(prune_checkpoints(tmp_path, 1)) == []

    final = save_checkpoint(tmp_path, 2, lambda d: (d / "a").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["a", STATE_FILE]
    assert not temporary_checkpoint_dir(tmp_path, 2).exists()
    assert find_latest_checkpoint(tmp_path) == final


def test_saving_a_step_again_replaces_it_and_clears_a_half_written_folder_of_that_name(tmp_path):
    half_written(tmp_path, 3)
    final = save_checkpoint(tmp_path, 3, lambda d: (d / "b").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == ["b", STATE_FILE]
    final = save_checkpoint(tmp_path, 3, lambda d: (d / "c").write_text("newer"))
    assert sorted(p.name for p in final.iterdir()) == ["c", STATE_FILE]


def test_every_process_writes_into_the_same_folder_between_barriers(tmp_path):
    """Two simulated processes (threads) with a barrier as `wait`: both ranks' files end up in the
    final folder, and the state file is written by the main process only. Rank 1 writes slowly:
    the main process must wait for it before it renames the folder."""
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def write(folder, rank):
        if rank == 1:
            time.sleep(0.3)
        (folder / f"rng_state_{rank}.json").write_text(str(rank))

    def process(rank):
        try:
            results[rank] = save_checkpoint(
                tmp_path, 5, lambda d: write(d, rank), is_main_process=rank == 0, wait=barrier.wait,
                state={"global_step": 5})
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = tmp_path / "checkpoint-5"
    assert results == {0: final, 1: final}
    assert sorted(p.name for p in final.iterdir()) == ["rng_state_0.json", "rng_state_1.json", STATE_FILE]
    assert not temporary_checkpoint_dir(tmp_path, 5).exists()


def test_saving_a_step_again_puts_the_new_copy_in_place_before_deleting_the_old(tmp_path, monkeypatch):
    """A crash while the old copy of `checkpoint-N` is being deleted leaves the new one in place."""
    from refseg.training import checkpointing

    def write(tag):
        return lambda folder: (folder / "weights.txt").write_text(tag)

    save_checkpoint(tmp_path, 4, write("old"))

    def crash(path, *args, **kwargs):
        raise OSError(f"killed while deleting {path}")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", crash)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 4, write("new"))
    assert (tmp_path / "checkpoint-4" / "weights.txt").read_text() == "new"
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
