"""The grouped-by-image training sampler (`MethodSpec.sampler = "grouped_by_image"`, Prompt-RIS ICL).

Unit tests of `refseg.training.samples.GroupedTrainSamples`, `GroupedProcessorCollator`, `mask_words`
and the sampler registry on small synthetic ref tables, then `scripts/train.py` end to end with a
temporary `MethodSpec` (RISCLIP on the grouped sampler): it trains, checkpoints and resumes exactly,
and a model whose `forward` names `group_ids` / `instance_ids` receives them with whole images per
micro-batch.
"""

import dataclasses
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.data import RandomAffineSaturation
from refseg.training import registry
from refseg.training.samples import (
    GROUP_INPUTS,
    GroupedProcessorCollator,
    GroupedTrainSamples,
    build_train_data,
    epoch_permutation,
    forward_input_names,
    get_train_sampler,
    mask_words,
)

SIZE = (12, 10)  # (width, height) of the synthetic images


def make_grouped_rows(sentence_counts, *, shared_ann=()):
    """Ref rows (dicts, as `load_refer` rows) for images whose refs have `sentence_counts[i]` sentences.

    `sentence_counts = [[3, 2], [2]]`: image 0 has two refs (3 and 2 sentences), image 1 one ref. Each
    ref has its own mask (a distinct set of pixels) and each image its own colour; sentences are
    distinct multi-word strings. `shared_ann`: `(ref_a, ref_b)` pairs whose `ann_id` is made equal
    (two refs of one object, as when RefCOCO and RefCOCOg are combined). The refs of different images
    are interleaved, as in a refer pickle.
    """
    refs = []
    ref_id = 0
    for image_id, counts in enumerate(sentence_counts):
        image = Image.new("RGB", SIZE, (10 * image_id, 20, 200 - 10 * image_id))
        for r, count in enumerate(counts):
            mask = np.zeros(SIZE[::-1], dtype=np.uint8)
            mask.flat[ref_id::7] = 255  # distinct per ref
            refs.append({"image": image, "mask": Image.fromarray(mask, mode="L"), "image_id": 100 + image_id,
                         "ref_id": ref_id, "ann_id": 1000 + ref_id,
                         "sentences": [f"the shape {ref_id} number {k} of image {image_id} on the left"
                                       for k in range(count)]})
            ref_id += 1
    by_ref = {r["ref_id"]: r for r in refs}
    for a, b in shared_ann:
        by_ref[b]["ann_id"] = by_ref[a]["ann_id"]
    order = sorted(range(len(refs)), key=lambda i: (i % 2, i))  # interleave images
    return [refs[i] for i in order]


class FakeProcessor:
    """Stands in for a method processor: images, texts and masks in, tensors (and the texts) out."""

    def __call__(self, images, text, masks=None, return_tensors="pt"):
        assert len(images) == len(text) == len(masks)
        return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)) for i in images]),
                "labels": torch.stack([torch.from_numpy(np.asarray(m) > 0).float() for m in masks]),
                "text": list(text), "original_sizes": torch.zeros(len(images), 2)}


COUNTS = [[3, 2], [2], [1, 1], [4], [1, 1, 1, 1], [2, 2], [1], [5, 1]]  # S = 5, 2, 2, 4, 4, 4, 1, 6


# ---------------------------------------------------------------- items


@pytest.mark.parametrize("b", [1, 2, 4, 6])
def test_each_item_is_one_image_with_b_sentences_each_with_its_own_referent_mask_and_instance(b):
    rows = make_grouped_rows(COUNTS)
    samples = GroupedTrainSamples(rows, sentences_per_image=b, seed=1)
    assert len(samples) == len(COUNTS)
    assert samples.image_ids == list(dict.fromkeys(r["image_id"] for r in rows))
    for epoch in range(3):
        samples.set_epoch(epoch)
        for index in range(len(samples)):
            item = samples[index]
            assert item["index"] == index and item["image_id"] == samples.image_ids[index]
            for key in ("masks", "texts", "instance_ids", "ref_ids", "rows", "word_masked"):
                assert len(item[key]) == b, key
            assert np.array_equal(np.asarray(item["image"]), np.asarray(rows[item["rows"][0]]["image"]))
            for k in range(b):
                row = rows[item["rows"][k]]
                assert row["image_id"] == item["image_id"], "every sentence comes from the item's image"
                assert np.array_equal(np.asarray(item["masks"][k]), np.asarray(row["mask"])), "row k's own mask"
                assert item["instance_ids"][k] == row["ann_id"] and item["ref_ids"][k] == row["ref_id"]
                if not item["word_masked"][k]:
                    assert item["texts"][k] in row["sentences"]
            ids, refs = item["instance_ids"], item["ref_ids"]
            for i in range(b):
                for j in range(b):
                    assert (ids[i] == ids[j]) == (refs[i] == refs[j])  # no shared ann_id here


def test_sentences_of_one_ref_share_the_instance_id_and_refs_of_one_object_too():
    rows = make_grouped_rows([[2, 2]], shared_ann=[(0, 1)])
    item = GroupedTrainSamples(rows, sentences_per_image=4)[0]
    assert sorted(item["ref_ids"]) == [0, 0, 1, 1] and len(set(item["instance_ids"])) == 1
    # without ann_id the ref id is the instance
    bare = [{k: v for k, v in r.items() if k != "ann_id"} for r in make_grouped_rows([[2, 2]])]
    item = GroupedTrainSamples(bare, sentences_per_image=4)[0]
    assert item["instance_ids"] == item["ref_ids"] and sorted(item["instance_ids"]) == [0, 0, 1, 1]


def test_an_image_with_at_least_b_sentences_gives_b_distinct_unmasked_ones_and_uses_all_over_epochs():
    rows = make_grouped_rows([[3, 2], [5, 1], [4]])
    samples = GroupedTrainSamples(rows, sentences_per_image=4, seed=0)
    seen = {i: set() for i in range(3)}
    for epoch in range(30):
        samples.set_epoch(epoch)
        for index in range(3):
            item = samples[index]
            assert not any(item["word_masked"]), "no masking when the image has b sentences or more"
            pairs = list(zip(item["rows"], item["texts"]))
            assert len(set(pairs)) == 4, "b distinct sentences"
            for row, text in pairs:
                assert text in rows[row]["sentences"]
            seen[index] |= set(pairs)
    for index in range(3):
        assert len(seen[index]) == samples.num_sentences(index), "every sentence of the image is drawn over epochs"
    assert {len(seen[i]) for i in range(3)} == {5, 6, 4}


def test_an_image_with_fewer_than_b_sentences_repeats_some_with_words_dropped():
    rows = make_grouped_rows([[2], [1, 1], [1]])
    b = 5
    samples = GroupedTrainSamples(rows, sentences_per_image=b, word_mask_rate=0.25, seed=2)
    for epoch in range(5):
        samples.set_epoch(epoch)
        for index in range(3):
            item = samples[index]
            s = samples.num_sentences(index)
            originals = [(r, t) for r, t, m in zip(item["rows"], item["texts"], item["word_masked"]) if not m]
            repeats = [(r, t) for r, t, m in zip(item["rows"], item["texts"], item["word_masked"]) if m]
            assert item["word_masked"] == [False] * s + [True] * (b - s), "the S originals, then b - S masked repeats"
            assert len(set(originals)) == s and all(t in rows[r]["sentences"] for r, t in originals)
            for row, text in repeats:
                words = text.split()
                sources = [sentence.split() for sentence in rows[row]["sentences"]]
                assert any(_is_subsequence(words, w) and len(w) - len(words) == int(0.25 * len(w) + 0.5)
                           for w in sources), f"{text!r}: no sentence of its ref with 1/4 of the words dropped"
            assert samples[index] == item, "the same draw again"


def _is_subsequence(short, long):
    it = iter(long)
    return all(w in it for w in short)


def test_repeats_of_one_word_sentences_and_rate_zero_are_unchanged():
    rows = [{**r, "sentences": ["circle"]} for r in make_grouped_rows([[1]])]
    item = GroupedTrainSamples(rows, sentences_per_image=3)[0]
    assert item["texts"] == ["circle"] * 3 and item["word_masked"] == [False] * 3
    rows = make_grouped_rows([[1]])
    item = GroupedTrainSamples(rows, sentences_per_image=3, word_mask_rate=0.0)[0]
    assert item["texts"] == rows[0]["sentences"] * 3 and not any(item["word_masked"])


def test_mask_words_drops_round_rate_n_words_keeps_order_and_never_all():
    sentence = "a b c d e f g h"
    for rate, dropped in ((0.25, 2), (0.1, 1), (0.5, 4), (0.99, 7)):
        for seed in range(10):
            text, masked = mask_words(sentence, rate, np.random.default_rng(seed))
            assert masked and len(text.split()) == 8 - dropped and _is_subsequence(text.split(), sentence.split())
    assert mask_words("a b", 0.25, np.random.default_rng(0))[0] in ("a", "b")
    assert mask_words("a", 0.9, np.random.default_rng(0)) == ("a", False)
    assert mask_words("a b c", 0.0, np.random.default_rng(0)) == ("a b c", False)
    draws = {mask_words(sentence, 0.25, np.random.default_rng(s))[0] for s in range(20)}
    assert len(draws) > 1, "which words go is random"
    assert mask_words(sentence, 0.25, np.random.default_rng(3)) == mask_words(sentence, 0.25, np.random.default_rng(3))


def test_items_are_a_pure_function_of_seed_epoch_and_index():
    rows = make_grouped_rows(COUNTS)

    def draws(samples, order):
        return [(samples[i]["rows"], samples[i]["texts"]) for i in order]

    a, b = GroupedTrainSamples(rows, seed=7), GroupedTrainSamples(rows, seed=7)
    forward = draws(a, range(len(COUNTS)))
    assert draws(b, reversed(range(len(COUNTS)))) == forward[::-1], "the draw must not depend on access order"
    a.set_epoch(1)
    b.set_epoch(1)
    assert draws(a, range(len(COUNTS))) == draws(b, range(len(COUNTS))) != forward, "a new epoch draws anew"
    assert draws(GroupedTrainSamples(rows, seed=8), range(len(COUNTS))) != forward, "a new seed draws anew"


def test_augmentation_applies_one_transform_to_the_image_and_every_mask():
    # the image encodes the masks of its two refs (red: ref 0, green: ref 1); nearest resampling and
    # no saturation change keep the encoding exact under any affine map
    red, green = np.zeros((40, 48), bool), np.zeros((40, 48), bool)
    red[5:20, 4:22] = True
    green[22:36, 26:44] = True
    pixels = np.zeros((40, 48, 3), np.uint8)
    pixels[red, 0] = 255
    pixels[green, 1] = 255
    image = Image.fromarray(pixels)
    rows = [{"image": image, "mask": Image.fromarray(m.astype(np.uint8) * 255, mode="L"), "image_id": 1,
             "ref_id": r, "ann_id": r, "sentences": [f"ref {r} a", f"ref {r} b"]} for r, m in enumerate((red, green))]
    augment = RandomAffineSaturation(degrees=30, translate=(0.2, 0.2), scale=(0.7, 1.3), shear=10, saturation=0.0,
                                     p=1.0, interpolation="nearest")
    samples = GroupedTrainSamples(rows, sentences_per_image=4, seed=0, augment=augment)
    moved = 0
    for epoch in range(4):
        samples.set_epoch(epoch)
        item = samples[0]
        out = np.asarray(item["image"])
        for k in range(4):
            mask = np.asarray(item["masks"][k]) > 0
            channel = item["ref_ids"][k]
            assert np.array_equal(mask, out[..., channel] > 0), "mask and image moved differently"
        moved += not np.array_equal(out, pixels)
        assert samples[0]["masks"][0].tobytes() == item["masks"][0].tobytes(), "augmentation is deterministic"
    assert moved == 4


# ---------------------------------------------------------------- collation and sharding


def collated(samples, collator, indices):
    return collator([samples[i] for i in indices])


def test_collator_gives_b_consecutive_rows_per_image_with_group_and_instance_ids():
    rows = make_grouped_rows(COUNTS)
    samples = GroupedTrainSamples(rows, sentences_per_image=4, seed=0)
    batch = collated(samples, GroupedProcessorCollator(FakeProcessor()), [5, 2, 7])
    assert "original_sizes" not in batch
    assert batch["group_ids"].dtype == batch["instance_ids"].dtype == torch.long
    assert batch["group_ids"].tolist() == [5] * 4 + [2] * 4 + [7] * 4
    items = [samples[i] for i in (5, 2, 7)]
    assert batch["text"] == [t for item in items for t in item["texts"]]
    assert batch["instance_ids"].tolist() == [i for item in items for i in item["instance_ids"]]
    for row, (item, k) in enumerate((item, k) for item in items for k in range(4)):
        assert torch.equal(batch["labels"][row], torch.from_numpy(np.asarray(item["masks"][k]) > 0).float())
        assert torch.equal(batch["pixel_values"][row], torch.from_numpy(np.asarray(item["image"], np.float32)))
    # only the inputs the model takes
    assert set(collated(samples, GroupedProcessorCollator(FakeProcessor(), extra_inputs=()), [1])) == {
        "pixel_values", "labels", "text"}
    only_instances = GroupedProcessorCollator(FakeProcessor(), extra_inputs=("instance_ids",))
    assert "group_ids" not in collated(samples, only_instances, [1])
    with pytest.raises(ValueError, match="extra_inputs"):
        GroupedProcessorCollator(FakeProcessor(), extra_inputs=("image_index",))


def test_the_extra_inputs_follow_the_model_forward_signature():
    class Strict(torch.nn.Module):  # like RISCLIP: a catch-all that refuses anything unexpected
        def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, **kwargs):
            pass

    class Grouped(torch.nn.Module):
        def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, *, group_ids=None,
                    instance_ids=None, **method_inputs):
            pass

    assert not set(GROUP_INPUTS) & forward_input_names(Strict())
    assert set(GROUP_INPUTS) <= forward_input_names(Grouped())
    rows = make_grouped_rows(COUNTS)
    for model, expected in ((Strict(), set()), (Grouped(), set(GROUP_INPUTS))):
        data = build_train_data("grouped_by_image", rows, FakeProcessor(), per_device_batch_size=4,
                                sentences_per_image=2, model_inputs=forward_input_names(model))
        batch = data.collator([data.samples[i] for i in next(iter(data.sampler))])
        assert set(GROUP_INPUTS) & set(batch) == expected
    # the random sampler never adds them
    ref_rows = make_grouped_rows(COUNTS)
    data = build_train_data("random", ref_rows, FakeProcessor(), per_device_batch_size=4,
                            model_inputs=forward_input_names(Grouped()))
    batch = data.collator([data.samples[i] for i in next(iter(data.sampler))])
    assert not set(GROUP_INPUTS) & set(batch)


def rank_batches(rows, *, b, rows_per_device, processes, epoch, seed=0, start_batch=0):
    """`[[rank 0 collated batch, rank 1 ...] per global batch]` of one epoch, each rank its own objects."""
    per_rank = []
    for rank in range(processes):
        data = build_train_data("grouped_by_image", rows, FakeProcessor(), per_device_batch_size=rows_per_device,
                                rank=rank, num_processes=processes, seed=seed, sentences_per_image=b)
        data.samples.set_epoch(epoch)
        data.sampler.set_epoch(epoch, start_batch=start_batch)
        per_rank.append([data.collator([data.samples[i] for i in indices]) for indices in data.sampler])
        assert len(data.sampler) == len(per_rank[-1])
    assert len({len(r) for r in per_rank}) == 1
    return [list(step) for step in zip(*per_rank)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_two_ranks_split_each_global_batch_by_whole_images_and_cover_every_image_once():
    rows = make_grouped_rows(COUNTS)  # 8 images
    b = 2
    for epoch in range(3):
        single = rank_batches(rows, b=b, rows_per_device=8, processes=1, epoch=epoch)
        sharded = rank_batches(rows, b=b, rows_per_device=4, processes=2, epoch=epoch)
        assert len(single) == len(sharded) == 2
        seen = []
        for one, (r0, r1) in zip(single, sharded):
            for part in (r0, r1):
                groups = part["group_ids"].tolist()
                assert len(groups) == 4 and groups[0::2] == groups[1::2], "b consecutive rows per image"
                assert groups[0] != groups[2]
                seen += groups[0::2]
            # the two ranks' rows, in rank order, are the single process's batch
            for key in ("group_ids", "instance_ids", "labels", "pixel_values"):
                assert torch.equal(torch.cat([r0[key], r1[key]]), one[0][key]), key
            assert r0["text"] + r1["text"] == one[0]["text"]
        assert sorted(seen) == list(range(8)), "each image once per epoch, on one rank only"
        assert seen == epoch_permutation(8, 0, epoch).tolist()


def test_resuming_mid_epoch_gives_the_rest_of_the_epoch_on_every_rank():
    rows = make_grouped_rows(COUNTS * 2)  # 16 images, 4 global batches of 2 x 2 images
    full = rank_batches(rows, b=4, rows_per_device=8, processes=2, epoch=3, seed=5)
    assert len(full) == 4
    for start in (1, 3, 4):  # fresh objects, as after a restart
        resumed = rank_batches(rows, b=4, rows_per_device=8, processes=2, epoch=3, seed=5, start_batch=start)
        assert len(resumed) == len(full) - start
        for step_full, step_resumed in zip(full[start:], resumed):
            assert all(_same(x, y) for x, y in zip(step_full, step_resumed))


# ---------------------------------------------------------------- arguments, registry, real data


def test_bad_arguments_are_refused_naming_them():
    rows = make_grouped_rows(COUNTS)
    with pytest.raises(ValueError, match="per_device_train_batch_size.*multiple of `sentences_per_image`"):
        build_train_data("grouped_by_image", rows, FakeProcessor(), per_device_batch_size=6, sentences_per_image=4)
    with pytest.raises(ValueError, match="8 images.*smaller than one global batch"):
        build_train_data("grouped_by_image", rows, FakeProcessor(), per_device_batch_size=20, sentences_per_image=4,
                         num_processes=2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="sentences_per_image"):
            GroupedTrainSamples(rows, sentences_per_image=bad)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="word_mask_rate"):
            GroupedTrainSamples(rows, word_mask_rate=bad)
    with pytest.raises(ValueError, match="image_id"):
        GroupedTrainSamples([{k: v for k, v in r.items() if k != "image_id"} for r in rows])
    with pytest.raises(ValueError, match="ref 3 has no sentences"):
        GroupedTrainSamples([{**r, "sentences": [] if r["ref_id"] == 3 else r["sentences"]} for r in rows])
    for call in (lambda: get_train_sampler("by_image"),
                 lambda: build_train_data("by_image", rows, FakeProcessor(), per_device_batch_size=4)):
        with pytest.raises(ValueError, match="sampler.*grouped_by_image.*random.*by_image"):
            call()


def test_grouped_samples_on_a_refer_dataset(refshapes_root):
    from refseg.data import load_refer

    ds = load_refer(refshapes_root, "refshapes", "unc", "train")
    samples = GroupedTrainSamples(ds, sentences_per_image=4, seed=0)
    image_ids = ds["image_id"]
    assert len(samples) == len(set(image_ids))
    assert sum(len(g) for g in samples.groups) == len(ds)
    for index in (0, len(samples) // 2, len(samples) - 1):
        item = samples[index]
        for k, row in enumerate(item["rows"]):
            ref = ds[row]
            assert ref["image_id"] == item["image_id"] and item["instance_ids"][k] == ref["ann_id"]
            assert np.array_equal(np.asarray(item["masks"][k]), np.asarray(ref["mask"]))
            assert np.array_equal(np.asarray(item["image"]), np.asarray(ref["image"].convert("RGB")))


# ---------------------------------------------------------------- scripts/train.py


def _train_args(tiny_backbones, refshapes_root, output_dir, **overrides):
    args = {
        "method": "risclip_grouped", "clip": str(tiny_backbones["clip"]), "dataset": "refshapes",
        "data_root": str(refshapes_root), "output_dir": str(output_dir), "seed": 3,
        "per_device_train_batch_size": 8, "sentences_per_image": 4, "max_train_samples": 22,
        "learning_rate": 1e-3, "stages": "locator:4,refiner:2", "stage_unit": "steps", "eval_splits": "",
        "report_to": "none", "logging_steps": 1, "config_overrides": json.dumps({"image_size": 64}),
    }
    args.update(overrides)
    return [token for k, v in args.items() for token in (f"--{k}", str(v))]


@pytest.fixture
def grouped_method(monkeypatch):
    """Registers `risclip_grouped` (RISCLIP on the grouped sampler) and `risclip_recording` (the same with
    a model whose forward names `group_ids` and `instance_ids` and records them while training)."""
    from refseg import RisclipModel

    class RecordingRisclip(RisclipModel):
        calls = []

        def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, group_ids=None,
                    instance_ids=None, **kwargs):
            if self.training:
                RecordingRisclip.calls.append({"group_ids": group_ids.tolist(), "instance_ids": instance_ids.tolist(),
                                               "input_ids": input_ids.tolist(), "labels": labels.sum((1, 2)).tolist()})
            return super().forward(pixel_values, input_ids, attention_mask, labels, **kwargs)

    module = types.ModuleType("refseg_test_grouped_models")
    module.RecordingRisclip = RecordingRisclip
    monkeypatch.setitem(sys.modules, module.__name__, module)
    base = registry.METHODS["risclip"]
    monkeypatch.setitem(registry.METHODS, "risclip_grouped", dataclasses.replace(base, sampler="grouped_by_image"))
    monkeypatch.setitem(registry.METHODS, "risclip_recording", dataclasses.replace(
        base, sampler="grouped_by_image", model_class=f"{module.__name__}.RecordingRisclip"))
    monkeypatch.setitem(registry.METHODS, "risclip_unknown_sampler", dataclasses.replace(base, sampler="by_image"))
    return RecordingRisclip


def _final_weights(output_dir):
    from transformers import AutoModel

    import refseg  # noqa: F401

    return AutoModel.from_pretrained(output_dir).trainable_state_dict()


@pytest.mark.slow
def test_train_script_with_the_grouped_sampler_checkpoints_and_resumes_exactly(
        tiny_backbones, refshapes_root, tmp_path, grouped_method, single_thread):
    """RISCLIP (whose forward takes no group inputs) on the grouped sampler: 6 updates over ~1.2 epochs,
    killed after update 4 and resumed from `latest`, ends with the uninterrupted run's weights."""
    import train

    out = tmp_path / "run"
    base = _train_args(tiny_backbones, refshapes_root, out, checkpointing_steps=2, checkpoints_total_limit=2,
                       eval_splits="val", max_eval_samples=8)
    train.main(base)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_batch_size"] == 8 and state["epoch"] == 0 and state["updates_into_epoch"] == 4
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["epoch"] == 1, "crosses an epoch"
    uninterrupted = _final_weights(out)
    shutil.rmtree(out / "checkpoint-6")
    for f in out.glob("*.safetensors"):
        f.unlink()
    train.main(base + ["--resume_from_checkpoint", "latest"])
    resumed = _final_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


def test_train_script_feeds_whole_images_and_group_inputs_to_a_model_that_takes_them(
        tiny_backbones, refshapes_root, tmp_path, grouped_method, single_thread):
    """16 rows per update = 2 micro-batches of 2 images x 4 sentences, 3 updates per epoch; after a resume
    from checkpoint-2 (mid-epoch) the model sees exactly the batches of updates 3-4 of the uninterrupted run."""
    import train

    from refseg.data import load_refer

    out = tmp_path / "run"
    args = _train_args(tiny_backbones, refshapes_root, out, method="risclip_recording", global_batch_size=16,
                       stages="locator:4", checkpointing_steps=2, max_train_samples=26)
    train.main(args)
    calls = list(grouped_method.calls)
    assert len(calls) == 8, "4 updates x 2 accumulation micro-batches"
    ds = load_refer(refshapes_root, "refshapes", "unc", "train").select(range(26))
    samples = GroupedTrainSamples(ds, sentences_per_image=4, seed=3)
    ann_of_image = {}
    for image_id, ann_id in zip(ds["image_id"], ds["ann_id"]):
        ann_of_image.setdefault(image_id, set()).add(ann_id)
    updates_per_epoch = len(samples) // 2 // 2  # micro-batches of 2 images, 2 per update
    assert updates_per_epoch == 3, "the test expects a resume from checkpoint-2 to start mid-epoch"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["updates_into_epoch"], state["gradient_accumulation_steps"]) == (0, 2, 2)
    expected = []
    for epoch in range(2):  # the images of whole updates, 4 per update
        expected += epoch_permutation(len(samples), 3, epoch)[:updates_per_epoch * 4].tolist()
    expected = expected[:16]
    seen = []
    for call in calls:
        groups = call["group_ids"]
        assert len(groups) == 8 and all(groups[i] == groups[i - i % 4] for i in range(8)), "whole images"
        assert groups[0] != groups[4]
        seen += groups[0::4]
        for group, instance in zip(groups, call["instance_ids"]):
            assert instance in ann_of_image[samples.image_ids[group]], "instance ids are the image's objects"
        assert all(total > 0 for total in call["labels"])
    assert seen == expected

    grouped_method.calls.clear()
    shutil.rmtree(out / "checkpoint-4")
    train.main(args + ["--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert grouped_method.calls == calls[4:]


def test_train_script_refuses_an_unknown_sampler_and_a_batch_that_splits_images(
        tiny_backbones, refshapes_root, tmp_path, grouped_method):
    import train

    with pytest.raises(ValueError, match="sampler.*by_image"):
        train.main(_train_args(tiny_backbones, refshapes_root, tmp_path / "a", method="risclip_unknown_sampler"))
    with pytest.raises(ValueError, match="multiple of `sentences_per_image`"):
        train.main(_train_args(tiny_backbones, refshapes_root, tmp_path / "b", per_device_train_batch_size=6))
