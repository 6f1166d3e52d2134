"""Unit tests of `refseg.training.samples`: the epoch order, its sharding over processes, the
resume position, the evaluation shards and the per-(seed, epoch, index) sentence draw.

`scripts/train.py` relies on these to make a resumed or multi-process run see exactly the samples
of an uninterrupted single-process run; the whole-script tests only check that end to end.
"""

import numpy as np
import pytest
from PIL import Image

from refseg.training.samples import (
    EvalSamples,
    ShardedEpochBatchSampler,
    TrainSamples,
    epoch_permutation,
    shard_indices,
)


def epoch_batches(num_samples, *, batch, processes, seed=0, epoch=0, start_batch=0, shuffle=True):
    """`[[rank 0 batch, rank 1 batch, ...] per global batch]` of one epoch."""
    per_rank = []
    for rank in range(processes):
        sampler = ShardedEpochBatchSampler(num_samples, per_device_batch_size=batch, rank=rank,
                                           num_processes=processes, seed=seed, shuffle=shuffle)
        sampler.set_epoch(epoch, start_batch=start_batch)
        per_rank.append(list(sampler))
        assert len(sampler) == len(per_rank[-1])
    assert len({len(b) for b in per_rank}) == 1, "every process must run the same number of batches"
    return [list(step) for step in zip(*per_rank)]


# ---------------------------------------------------------------- epoch_permutation


def test_epoch_permutation_is_a_deterministic_permutation_that_changes_with_epoch_and_seed():
    order = epoch_permutation(50, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(50))
    np.testing.assert_array_equal(order, epoch_permutation(50, seed=3, epoch=0))
    assert not np.array_equal(order, epoch_permutation(50, seed=3, epoch=1))
    assert not np.array_equal(order, epoch_permutation(50, seed=4, epoch=0))


# ---------------------------------------------------------------- ShardedEpochBatchSampler


@pytest.mark.parametrize("num_samples,batch,processes", [(24, 2, 3), (13, 2, 2), (17, 3, 1), (7, 1, 4)])
def test_processes_split_each_global_batch_of_the_single_process_order(num_samples, batch, processes):
    """Union over ranks of step b == the single-process batch b of size batch*processes; no index
    twice in an epoch; only the last incomplete global batch of the shuffled order is dropped."""
    g = batch * processes
    single = epoch_batches(num_samples, batch=g, processes=1, epoch=2)
    sharded = epoch_batches(num_samples, batch=batch, processes=processes, epoch=2)
    assert len(sharded) == len(single) == num_samples // g
    for step, (one, parts) in enumerate(zip(single, sharded)):
        assert all(len(p) == batch for p in parts)
        assert [i for p in parts for i in p] == one[0], f"global batch {step} differs"
    seen = [i for step in sharded for p in step for i in p]
    assert len(seen) == len(set(seen)) == (num_samples // g) * g
    order = epoch_permutation(num_samples, seed=0, epoch=2).tolist()
    assert seen == order[: len(seen)]


def test_when_the_batch_divides_the_set_every_index_is_seen_exactly_once_per_epoch():
    for epoch in range(3):
        seen = [i for step in epoch_batches(24, batch=2, processes=3, epoch=epoch) for p in step for i in p]
        assert sorted(seen) == list(range(24))


def test_uneven_set_drops_a_different_remainder_each_epoch_and_sees_everything_over_epochs():
    seen, dropped = set(), []
    for epoch in range(12):
        epoch_seen = {i for step in epoch_batches(13, batch=2, processes=2, epoch=epoch) for p in step for i in p}
        assert len(epoch_seen) == 12
        dropped.append(next(iter(set(range(13)) - epoch_seen)))
        seen |= epoch_seen
    assert seen == set(range(13))
    assert len(set(dropped)) > 1


def test_start_batch_resumes_at_that_global_batch_on_every_process():
    full = epoch_batches(30, batch=2, processes=2, seed=5, epoch=3)
    for start in (0, 1, 4, len(full) - 1, len(full)):
        resumed = epoch_batches(30, batch=2, processes=2, seed=5, epoch=3, start_batch=start)
        assert resumed == full[start:]


def test_same_seed_same_order_different_epoch_or_seed_different_order():
    a = epoch_batches(20, batch=2, processes=2, seed=1, epoch=0)
    assert a == epoch_batches(20, batch=2, processes=2, seed=1, epoch=0)
    assert a != epoch_batches(20, batch=2, processes=2, seed=1, epoch=1)
    assert a != epoch_batches(20, batch=2, processes=2, seed=2, epoch=0)


def test_set_epoch_changes_the_order_of_an_existing_sampler():
    sampler = ShardedEpochBatchSampler(20, per_device_batch_size=4, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_no_shuffle_gives_the_natural_order():
    assert epoch_batches(9, batch=2, processes=2, shuffle=False, epoch=4) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_a_set_smaller_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ShardedEpochBatchSampler(5, per_device_batch_size=3, num_processes=2)


# ---------------------------------------------------------------- shard_indices


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4, 7])
def test_shard_indices_cover_every_sample_exactly_once_in_order(num_processes):
    for num_samples in range(0, 23):
        shards = [shard_indices(num_samples, rank, num_processes) for rank in range(num_processes)]
        assert [i for s in shards for i in s] == list(range(num_samples)), (num_samples, shards)
        sizes = [len(s) for s in shards]
        assert max(sizes) <= -(-num_samples // num_processes)


# ---------------------------------------------------------------- TrainSamples / EvalSamples


def make_rows(num_rows, num_sentences=4):
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    mask = Image.new("L", (8, 6), 0)
    return [{"image": image, "mask": mask, "ref_id": i,
             "sentences": [f"ref {i} sentence {k}" for k in range(num_sentences)]} for i in range(num_rows)]


def texts(samples, order):
    return [samples[i]["text"] for i in order]


def test_train_sentence_is_a_pure_function_of_seed_epoch_and_index():
    rows = make_rows(40)
    a, b = TrainSamples(rows, seed=7), TrainSamples(rows, seed=7)
    forward = texts(a, range(40))
    assert texts(b, reversed(range(40))) == forward[::-1], "the draw must not depend on access order"
    assert texts(a, range(40)) == forward, "drawing again must give the same sentence"
    for i, text in enumerate(forward):
        assert text in rows[i]["sentences"]
        assert a[i]["index"] == i
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = texts(a, range(40))
    assert epoch1 == texts(b, range(40))
    assert epoch1 != forward, "a new epoch must draw new sentences"
    assert texts(TrainSamples(rows, seed=8), range(40)) != forward, "a new seed must draw new sentences"


def test_train_sentence_draw_uses_every_sentence_over_epochs():
    samples = TrainSamples(make_rows(3), seed=0)
    chosen = set()
    for epoch in range(40):
        samples.set_epoch(epoch)
        chosen |= set(texts(samples, range(3)))
    assert chosen == {s for r in make_rows(3) for s in r["sentences"]}


def test_train_augmentation_gets_the_same_generator_for_the_same_sample():
    draws = []

    def augment(image, mask, rng):
        draws.append(float(rng.random()))
        return image, mask

    samples = TrainSamples(make_rows(2), seed=0, augment=augment)
    samples[1], samples[1]
    samples.set_epoch(1)
    samples[1]
    assert draws[0] == draws[1] != draws[2]


def test_train_item_fields_and_empty_sentences():
    item = TrainSamples(make_rows(1))[0]
    assert set(item) == {"image", "mask", "text", "index"} and item["image"].mode == "RGB"
    with pytest.raises(ValueError, match="no sentences"):
        TrainSamples(make_rows(1, num_sentences=0))[0]


def test_eval_samples_keep_every_sentence_in_order():
    rows = [{"image": Image.new("L", (4, 4)), "mask": Image.new("L", (4, 4)), "sentence": f"s{i}"} for i in range(3)]
    samples = EvalSamples(rows)
    assert [samples[i]["text"] for i in range(3)] == ["s0", "s1", "s2"]
    assert [samples[i]["index"] for i in range(3)] == [0, 1, 2] and samples[0]["image"].mode == "RGB"


# ---------------------------------------------------------------- the sampler registry (MethodSpec.sampler)


def test_the_random_sampler_builds_the_one_sentence_per_ref_set_unchanged():
    """`build_train_data("random", ...)`: `TrainSamples`, the plain epoch sampler and `ProcessorCollator`,
    exactly as scripts/train.py built them before samplers were selectable."""
    from refseg.training.samples import ProcessorCollator, build_train_data

    def augment(image, mask, rng):
        return image, mask

    rows = make_rows(13)
    processor = object()
    data = build_train_data("random", rows, processor, per_device_batch_size=2, rank=1, num_processes=2, seed=4,
                            augment=augment, sentences_per_image=4, word_mask_rate=0.5, model_inputs=frozenset())
    assert type(data.samples) is TrainSamples and data.rows_per_item == 1
    assert (data.samples.dataset, data.samples.seed, data.samples.augment) == (rows, 4, augment)
    assert type(data.collator) is ProcessorCollator and data.collator.processor is processor
    assert not data.collator.keep_targets
    direct = ShardedEpochBatchSampler(13, per_device_batch_size=2, rank=1, num_processes=2, seed=4)
    for epoch, start in ((0, 0), (2, 1)):
        data.sampler.set_epoch(epoch, start_batch=start)
        direct.set_epoch(epoch, start_batch=start)
        assert list(data.sampler) == list(direct)
        data.samples.set_epoch(epoch)
        reference = TrainSamples(rows, seed=4)
        reference.set_epoch(epoch)
        assert texts(data.samples, range(13)) == texts(reference, range(13))


def test_an_unknown_sampler_is_refused_naming_the_known_ones():
    from refseg.training.samples import TRAIN_SAMPLERS, build_train_data, get_train_sampler

    assert set(TRAIN_SAMPLERS) == {"random", "grouped_by_image"}
    with pytest.raises(ValueError, match=r"\['grouped_by_image', 'random'\], got 'shuffled'"):
        get_train_sampler("shuffled")
    with pytest.raises(ValueError, match="sampler"):
        build_train_data("shuffled", make_rows(4), None, per_device_batch_size=2)
