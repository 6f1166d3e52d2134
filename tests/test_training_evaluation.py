"""Unit tests of the distributed evaluation in `refseg.training.evaluation`: every sentence is
scored exactly once over all processes, the gathered rows come back sorted with the padding
dropped, and a shard plan with duplicates or gaps raises instead of reporting a wrong metric.

Processes are simulated: `FakeAccelerator` has the attributes and collectives `predict_counts` and
`gather_rows` use; for two processes, two threads exchange tensors through a barrier the way
`accelerate`'s `pad_across_processes` / `gather` do (pad at the end of dim 0, concatenate in rank
order). The model and processor are stand-ins whose prediction is all-foreground, so each row's
intersection is its target's area, which encodes the sample index.
"""

import contextlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.training import evaluation
from refseg.training.evaluation import evaluate_split, gather_rows, split_counts, summarize_by_group
from refseg.training.samples import EvalSamples

H, W = 4, 5


class World:
    """Shared state of `num_processes` simulated processes."""

    def __init__(self, num_processes):
        self.num_processes = num_processes
        self.barrier = threading.Barrier(num_processes, timeout=30)
        self.slots = [None] * num_processes

    def exchange(self, rank, value):
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class FakeAccelerator:
    def __init__(self, rank=0, world=None):
        self.world = world or World(1)
        self.process_index = rank
        self.num_processes = self.world.num_processes
        self.is_local_main_process = rank == 0
        self.device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        assert dim == 0
        longest = max(self.world.exchange(self.process_index, tensor.shape[0]))
        pad = tensor.new_full((longest - tensor.shape[0], *tensor.shape[1:]), pad_index)
        return torch.cat([tensor, pad])

    def gather(self, tensor):
        return torch.cat(self.world.exchange(self.process_index, tensor))


def run_processes(num_processes, fn):
    """`[fn(accelerator) for each rank]`, the ranks running concurrently as threads."""
    world = World(num_processes)
    results, errors = [None] * num_processes, []

    def target(rank):
        try:
            results[rank] = fn(FakeAccelerator(rank, world))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(num_processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


# ---------------------------------------------------------------- stand-in model and processor


class FakeProcessor:
    def __call__(self, images, text, masks=None, return_tensors="pt"):
        assert masks is None, "evaluation batches keep their targets apart"
        return {"pixel_values": torch.zeros(len(images), 1),
                "original_sizes": torch.tensor([[im.height, im.width] for im in images])}

    def post_process_referring_segmentation(self, outputs, target_sizes, threshold=None):
        return [torch.ones(h, w, dtype=torch.bool) for h, w in target_sizes]


class FakeModel(torch.nn.Module):
    def forward(self, pixel_values):
        return SimpleNamespace(logits=torch.zeros(pixel_values.shape[0], H, W))


def make_samples(n):
    """Sample i's target has i + 1 foreground pixels (n <= H*W), so its row is (i, i + 1, H*W)."""
    rows = []
    for i in range(n):
        mask = np.zeros(H * W, dtype=np.uint8)
        mask[: i + 1] = 255
        rows.append({"image": Image.new("RGB", (W, H)), "mask": Image.fromarray(mask.reshape(H, W)),
                     "sentence": f"sentence {i}"})
    return EvalSamples(rows)


def expected_rows(n):
    return np.stack([np.arange(n), np.arange(n) + 1, np.full(n, H * W)], axis=1)


# ---------------------------------------------------------------- gather_rows


def test_gather_rows_single_process_sorts_by_index():
    rows = np.array([[2, 1, 5], [0, 3, 4], [1, 0, 0]])
    np.testing.assert_array_equal(gather_rows(rows, FakeAccelerator()), [[0, 3, 4], [1, 0, 0], [2, 1, 5]])


def test_gather_rows_two_processes_interleaved_and_uneven():
    """Rank 0 holds 3 rows, rank 1 holds 2 (padded with -1 rows to 3): every process gets the same
    5 rows sorted by index, the padding gone."""
    local = {0: np.array([[4, 40, 41], [0, 0, 1], [2, 20, 21]]), 1: np.array([[3, 30, 31], [1, 10, 11]])}
    gathered = run_processes(2, lambda acc: gather_rows(local[acc.process_index], acc))
    want = [[0, 0, 1], [1, 10, 11], [2, 20, 21], [3, 30, 31], [4, 40, 41]]
    for out in gathered:
        np.testing.assert_array_equal(out, want)


def test_gather_rows_with_an_empty_shard():
    local = {0: np.array([[0, 1, 2]]), 1: np.zeros((0, 3), dtype=np.int64)}
    for out in run_processes(2, lambda acc: gather_rows(local[acc.process_index], acc)):
        np.testing.assert_array_equal(out, [[0, 1, 2]])


# ---------------------------------------------------------------- split_counts / evaluate_split


def counts(samples, accelerator, batch_size=2):
    return split_counts(FakeModel(), FakeProcessor(), samples, accelerator=accelerator, batch_size=batch_size)


def test_split_counts_single_process_covers_every_sample_once():
    np.testing.assert_array_equal(counts(make_samples(5), FakeAccelerator()), expected_rows(5))


@pytest.mark.parametrize("n,processes", [(5, 2), (7, 3), (1, 2), (6, 2)])
def test_split_counts_over_processes_gives_every_process_all_rows(n, processes):
    samples = make_samples(n)
    for out in run_processes(processes, lambda acc: counts(samples, acc)):
        np.testing.assert_array_equal(out, expected_rows(n))


def test_evaluate_split_metric_over_two_processes_equals_one_process():
    samples = make_samples(5)
    single = evaluate_split(FakeModel(), FakeProcessor(), samples, accelerator=FakeAccelerator(), batch_size=2)
    both = run_processes(2, lambda acc: evaluate_split(FakeModel(), FakeProcessor(), samples,
                                                       accelerator=acc, batch_size=3))
    assert single["num_samples"] == 5
    assert single["oIoU"] == pytest.approx(15 / (5 * H * W))
    assert both[0] == both[1] == single


@pytest.mark.parametrize("shards", [
    {0: [0, 1, 2], 1: [2, 3, 4]},  # one sample twice: too many rows
    {0: [0, 1, 2], 1: [2, 3]},  # one sample twice, one missing: the right number of rows
    {0: [0, 1], 1: [3, 4]},  # a gap
    {0: [0, 1, 2], 1: []},  # a whole shard missing
])
def test_duplicates_and_gaps_in_the_shards_raise(monkeypatch, shards):
    monkeypatch.setattr(evaluation, "shard_indices", lambda n, rank, world: shards[rank])
    samples = make_samples(5)
    with pytest.raises(RuntimeError, match="distinct of 5 samples"):
        run_processes(2, lambda acc: counts(samples, acc))


def test_a_gap_raises_in_a_single_process(monkeypatch):
    monkeypatch.setattr(evaluation, "shard_indices", lambda n, rank, world: list(range(n - 1)))
    with pytest.raises(RuntimeError, match="covered 3 distinct of 4 samples"):
        counts(make_samples(4), FakeAccelerator())


def test_the_model_comes_back_in_the_mode_it_was_in():
    model = FakeModel().train()
    split_counts(model, FakeProcessor(), make_samples(2), accelerator=FakeAccelerator())
    assert model.training
    split_counts(model.eval(), FakeProcessor(), make_samples(2), accelerator=FakeAccelerator())
    assert not model.training


def test_summarize_by_group_orders_groups_and_checks_labels():
    rows = expected_rows(4)
    out = summarize_by_group(rows, ["b", "a", "b", "c"], order=["c", "b"])
    assert list(out) == ["c", "b", "a"]
    assert out["b"]["num_samples"] == 2 and out["a"]["num_samples"] == 1
    with pytest.raises(ValueError, match="labels"):
        summarize_by_group(rows, ["a", "b"])


def test_an_index_outside_the_samples_cannot_hide_a_gap(monkeypatch):
    """Five distinct rows for five samples, but index 4 missing and 5 out of range."""
    rows = np.array([[0, 1, 2], [1, 1, 2], [2, 1, 2], [3, 1, 2], [5, 1, 2]])
    monkeypatch.setattr(evaluation, "predict_counts", lambda *args, **kwargs: rows)
    with pytest.raises(RuntimeError, match="evaluation covered"):
        split_counts(None, None, list(range(5)), accelerator=FakeAccelerator())
