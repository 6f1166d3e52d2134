"""Deterministic training and evaluation samples.

Every random choice of a training sample (which sentence of the ref, the augmentation) is a pure
function of `(seed, epoch, index)`, and the shuffling of an epoch is a pure function of
`(seed, epoch)`. So a resumed run, a run with DataLoader workers and a run split over several
processes see exactly the samples an uninterrupted single-process run sees.

Training samplers (`MethodSpec.sampler`, looked up in `TRAIN_SAMPLERS` by `build_train_data`):

- `"random"`: one item = one ref with one of its sentences (`TrainSamples`); one batch row per item.
- `"grouped_by_image"` (Prompt-RIS, Sec. 3.3 / 4.2, for Instance Contrastive Learning): one item =
  one image with `sentences_per_image` (b, default 4) sentences drawn from all the sentences of all
  its refs (`GroupedTrainSamples`); the item becomes b consecutive batch rows, each with its own
  sentence and its own referent's mask as `labels`. The epoch shuffles images, and a device batch
  holds whole images only: `per_device_train_batch_size` counts rows (sentences) and must be a
  multiple of b (the paper's batch 64 = 16 images x b = 4), so an image's rows are never split
  across processes or accumulation micro-batches. An image with at least b sentences gives b
  distinct sentences; one with S < b gives all S once plus b - S repeats drawn with replacement,
  each repeat with a share of its words dropped (`mask_words`). `GroupedProcessorCollator` adds
  `group_ids` (B,) long (the image's index in the grouped set, equal for the rows of one image)
  and `instance_ids` (B,) long (the referent's `ann_id`, else its `ref_id`: equal for rows about
  the same object), both only where the model's `forward` names them as parameters
  (`forward_input_names`), so a model that does not take them never receives them.

Generalized data (gRefCOCO, grefshapes: rows with `ann_ids`, an expression naming several objects or none)
trains through the same paths: a no-target row's mask, hence its `labels`, is all zeros (the presence head
reads its target from that, `refseg.no_target`). For `instance_ids`, the set of referents is the instance:
refs with the same `ann_ids` (sorted) share an id, numbered densely from 0 in order of first appearance. A
no-target row is an instance of its own (a negative id, -1 - its row in the item, so never shared): the
contrastive loss then pushes its mask apart from every other row's, which an empty mask satisfies, while a
shared "none" instance would ask two empty masks to overlap (their dice overlap is 0), which none can.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `range(num_samples)` for one epoch."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that decides everything random about sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index])


class TrainSamples(Dataset):
    """One ref per item: one of its sentences drawn at random, optionally augmented.

    Args:
        dataset: a `datasets.Dataset` with `image`, `mask`, `sentences` (as `refseg.data.load_refer`).
        seed: base seed of the sentence draw and the augmentation.
        augment: optional `fn(image, mask, rng) -> (image, mask)` on PIL images.

    Items are dicts `{"image": PIL RGB, "mask": PIL L, "text": str, "index": int}`.
    """

    def __init__(self, dataset, *, seed: int = 0, augment: Optional[Callable] = None):
        self.dataset = dataset
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[int(index)]
        rng = sample_rng(self.seed, self.epoch, int(index))
        sentences = row["sentences"]
        if not sentences:
            raise ValueError(f"ref {row.get('ref_id')} has no sentences")
        text = sentences[int(rng.integers(len(sentences)))]
        image, mask = row["image"].convert("RGB"), row["mask"]
        if self.augment is not None:
            image, mask = self.augment(image, mask, rng)
        return {"image": image, "mask": mask, "text": text, "index": int(index)}


class EvalSamples(Dataset):
    """One sentence per item (evaluation scores every sentence of every ref).

    `dataset` is the output of `refseg.data.explode_sentences`; items are dicts
    `{"image", "mask", "text", "index"}` with no randomness.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[int(index)]
        return {"image": row["image"].convert("RGB"), "mask": row["mask"], "text": row["sentence"],
                "index": int(index)}


class ShardedEpochBatchSampler(Sampler):
    """Yields this process's share of each global batch of one shuffled epoch.

    Global batch `b` holds `order[b*G:(b+1)*G]` with `G = per_device_batch_size * num_processes`;
    process `rank` takes its contiguous slice, so the union over processes is exactly the batch a
    single process with batch size `G` would see. Incomplete global batches are dropped (the order
    changes every epoch, so every sample is still seen). `start_batch` skips batches on resume.
    """

    def __init__(self, num_samples: int, *, per_device_batch_size: int, rank: int = 0,
                 num_processes: int = 1, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.per_device_batch_size = per_device_batch_size
        self.rank = rank
        self.num_processes = num_processes
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        if self.num_batches_per_epoch == 0:
            raise ValueError(
                f"the training set ({num_samples} samples) is smaller than one global batch "
                f"({per_device_batch_size} x {num_processes} processes)"
            )

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.num_processes

    @property
    def num_batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.num_batches_per_epoch - self.start_batch

    def __iter__(self):
        order = (epoch_permutation(self.num_samples, self.seed, self.epoch) if self.shuffle
                 else np.arange(self.num_samples))
        g, b = self.global_batch_size, self.per_device_batch_size
        for batch in range(self.start_batch, self.num_batches_per_epoch):
            start = batch * g + self.rank * b
            yield order[start:start + b].tolist()


def shard_indices(num_samples: int, rank: int, num_processes: int) -> list:
    """Indices evaluated by process `rank`: every sample exactly once over all processes."""
    per = math.ceil(num_samples / num_processes)
    return list(range(rank * per, min((rank + 1) * per, num_samples)))


class ProcessorCollator:
    """Turns a list of sample dicts into model inputs with the method's processor.

    Training batches carry `labels`; evaluation batches (`keep_targets=True`) also carry the
    original-size boolean target masks (`target_masks`, a list) and `indices` (B,) for gathering.
    """

    def __init__(self, processor, *, keep_targets: bool = False):
        self.processor = processor
        self.keep_targets = keep_targets

    def __call__(self, samples):
        images = [s["image"] for s in samples]
        masks = [s["mask"] for s in samples]
        batch = self.processor(images=images, text=[s["text"] for s in samples],
                               masks=None if self.keep_targets else masks, return_tensors="pt")
        batch = dict(batch)
        if self.keep_targets:
            batch["target_masks"] = [np.asarray(m) > 0 for m in masks]
            batch["indices"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        else:
            batch.pop("original_sizes", None)
        return batch


# ------------------------------------------------------------------ grouped by image (Prompt-RIS ICL)

DEFAULT_SENTENCES_PER_IMAGE = 4
DEFAULT_WORD_MASK_RATE = 0.25
GROUP_INPUTS = ("group_ids", "instance_ids")


def mask_words(sentence: str, rate: float, rng: np.random.Generator) -> tuple:
    """Drop a share of the words of a repeated sentence: `(text, masked)`.

    CLIP's tokenizer has no mask token, and replacing words by some placeholder word would add words
    the expression does not hold, so "masking out" a word means dropping it. Words are split on
    whitespace; `k = round(rate * n)` of the `n` words (half rounded up), at least 1 and at most
    `n - 1`, chosen uniformly without replacement, are removed and the rest keep their order. A
    one-word sentence, or `rate == 0`, comes back unchanged with `masked=False`.
    """
    words = sentence.split()
    n = len(words)
    if rate <= 0 or n < 2:
        return sentence, False
    k = min(n - 1, max(1, int(rate * n + 0.5)))
    drop = set(rng.choice(n, size=k, replace=False).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in drop), True


def _columns(dataset):
    """`(column names, get(name) -> list)` of a `datasets.Dataset` or a sequence of row dicts."""
    if hasattr(dataset, "column_names"):
        return set(dataset.column_names), lambda name: list(dataset[name])
    names = set(dataset[0]) if len(dataset) else set()
    return names, lambda name: [dataset[i][name] for i in range(len(dataset))]


class GroupedTrainSamples(Dataset):
    """One image per item, with `sentences_per_image` (b) sentences of its refs.

    The refs of `dataset` (one row per ref, as `refseg.data.load_refer`) are grouped by `image_id`,
    images in order of their first ref. Item `index` draws, with `sample_rng(seed, epoch, index)`:

    - S >= b sentences over the image's refs: b distinct (ref, sentence) pairs, uniformly, in random
      order (they may describe the same or different referents);
    - S < b: every pair once, in random order, then b - S pairs drawn with replacement, each with
      words dropped by `mask_words(sentence, word_mask_rate, rng)`;
    - with `augment`: one augmentation seed, so every mask of the item goes through the same random
      transform as the image (`augment(image, mask, rng)` is called once per distinct ref, each time
      with a fresh generator from that seed, and must be a pure function of its draws and inputs).

    Args:
        dataset: a `datasets.Dataset` (or sequence of row dicts) with `image`, `mask`, `sentences`,
            `image_id`, optionally `ref_id` and `ann_id` (or gRefCOCO's `ann_ids`).
        sentences_per_image: b, rows per item.
        word_mask_rate: share of words dropped from a repeated sentence (in [0, 1)).
        seed: base seed of the draws and the augmentation.
        augment: optional `fn(image, mask, rng) -> (image, mask)` on PIL images.

    Items are dicts: `image` (PIL RGB), `masks` (b PIL L, row k's referent), `texts` (b str),
    `instance_ids` (b int: `ann_id`, else `ref_id`; with `ann_ids`, the module docstring's), `ref_ids` (b int),
    `rows` (b ref-row indices into `dataset`), `word_masked` (b bool), `index` (int, the image's index here) and
    `image_id`.
    """

    def __init__(self, dataset, *, sentences_per_image: int = DEFAULT_SENTENCES_PER_IMAGE,
                 word_mask_rate: float = DEFAULT_WORD_MASK_RATE, seed: int = 0, augment: Optional[Callable] = None):
        if isinstance(sentences_per_image, bool) or not isinstance(sentences_per_image, int) or sentences_per_image < 1:
            raise ValueError(f"`sentences_per_image` must be an integer >= 1, got {sentences_per_image!r}")
        if not 0 <= word_mask_rate < 1:
            raise ValueError(f"`word_mask_rate` must be in [0, 1), got {word_mask_rate!r}")
        names, column = _columns(dataset)
        for name in ("image", "mask", "sentences", "image_id"):
            if name not in names:
                raise ValueError(f"the grouped_by_image sampler needs a `{name}` column; "
                                 f"the dataset has {sorted(names)}")
        self.dataset = dataset
        self.sentences_per_image = sentences_per_image
        self.word_mask_rate = float(word_mask_rate)
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self._sentences = column("sentences")
        self._ref_ids = [int(r) for r in column("ref_id")] if "ref_id" in names else list(range(len(dataset)))
        if "ann_ids" in names:  # generalized data: the set of referents; None for no target (module docstring)
            referents, dense = [tuple(sorted(int(a) for a in ids)) for ids in column("ann_ids")], {}
            self._instance_ids = [dense.setdefault(key, len(dense)) if key else None for key in referents]
        else:
            self._instance_ids = [int(a) for a in column("ann_id")] if "ann_id" in names else list(self._ref_ids)
        for row, sentences in enumerate(self._sentences):
            if not sentences:
                raise ValueError(f"ref {self._ref_ids[row]} has no sentences")
        groups = {}
        for row, image_id in enumerate(column("image_id")):
            groups.setdefault(int(image_id), []).append(row)
        self.image_ids = list(groups)
        self.groups = [tuple(rows) for rows in groups.values()]
        self._pools = [[(row, k) for row in rows for k in range(len(self._sentences[row]))] for rows in self.groups]
        # read one column per access: a ref's mask without decoding its image again
        select = getattr(dataset, "select_columns", None)
        self._images = select(["image"]) if select else dataset
        self._masks = select(["mask"]) if select else dataset

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.groups)

    def num_sentences(self, index: int) -> int:
        """How many sentences image `index` has over all its refs (S)."""
        return len(self._pools[int(index)])

    def __getitem__(self, index):
        index = int(index)
        pool, b = self._pools[index], self.sentences_per_image
        rng = sample_rng(self.seed, self.epoch, index)
        if len(pool) >= b:
            picks, repeats = rng.choice(len(pool), size=b, replace=False).tolist(), []
        else:
            picks, repeats = rng.permutation(len(pool)).tolist(), rng.integers(len(pool), size=b - len(pool)).tolist()
        rows, texts, masked = [], [], []
        for p, repeat in [(p, False) for p in picks] + [(p, True) for p in repeats]:
            row, k = pool[p]
            text, was_masked = (mask_words(self._sentences[row][k], self.word_mask_rate, rng) if repeat
                                else (self._sentences[row][k], False))
            rows.append(row)
            texts.append(text)
            masked.append(was_masked)
        image = self._images[self.groups[index][0]]["image"].convert("RGB")
        distinct = list(dict.fromkeys(rows))
        masks = {row: self._masks[row]["mask"] for row in distinct}
        if self.augment is not None:
            augment_seed = int(rng.integers(2**63))
            source, image = image, None
            for row in distinct:
                out_image, masks[row] = self.augment(source, masks[row], np.random.default_rng(augment_seed))
                image = out_image if image is None else image
        return {"image": image, "masks": [masks[row] for row in rows], "texts": texts,
                "instance_ids": [-1 - k if self._instance_ids[row] is None else self._instance_ids[row]
                                 for k, row in enumerate(rows)],
                "ref_ids": [self._ref_ids[row] for row in rows],
                "rows": rows, "word_masked": masked, "index": index, "image_id": self.image_ids[index]}


class GroupedProcessorCollator:
    """Flattens grouped items into model inputs: item i gives b consecutive rows (its image repeated).

    The batch holds what the processor gives (`labels` from each row's own mask; `original_sizes`
    dropped) plus, for each name in `extra_inputs` (a subset of `GROUP_INPUTS`): `group_ids` (B,)
    long, the item's `index` on each of its rows, and `instance_ids` (B,) long.
    """

    def __init__(self, processor, *, extra_inputs=GROUP_INPUTS):
        unknown = sorted(set(extra_inputs) - set(GROUP_INPUTS))
        if unknown:
            raise ValueError(f"`extra_inputs` may name {list(GROUP_INPUTS)}, got {unknown}")
        self.processor = processor
        self.extra_inputs = tuple(extra_inputs)

    def __call__(self, samples):
        images = [s["image"] for s in samples for _ in s["texts"]]
        texts = [t for s in samples for t in s["texts"]]
        masks = [m for s in samples for m in s["masks"]]
        batch = dict(self.processor(images=images, text=texts, masks=masks, return_tensors="pt"))
        batch.pop("original_sizes", None)
        if "group_ids" in self.extra_inputs:
            batch["group_ids"] = torch.tensor([s["index"] for s in samples for _ in s["texts"]], dtype=torch.long)
        if "instance_ids" in self.extra_inputs:
            batch["instance_ids"] = torch.tensor([i for s in samples for i in s["instance_ids"]], dtype=torch.long)
        return batch


# ------------------------------------------------------------------ sampler registry


def forward_input_names(model) -> frozenset:
    """The inputs `model.forward` names as parameters (a `**kwargs` catch-all names none).

    A method that consumes optional batch inputs (`group_ids`, `instance_ids`) declares them as
    keyword parameters of its `forward`; the training collator adds only those.
    """
    forward = getattr(model, "forward", model)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in inspect.signature(forward).parameters.items() if p.kind in kinds)


@dataclass
class TrainData:
    """What a training run iterates: `samples` (with `set_epoch`), the batch `sampler` (a
    `ShardedEpochBatchSampler` over items, with `set_epoch(epoch, start_batch)` and
    `num_batches_per_epoch`), the `collator`, and `rows_per_item` (batch rows one item becomes)."""

    samples: Dataset
    sampler: ShardedEpochBatchSampler
    collator: Callable
    rows_per_item: int = 1


def _random_train_data(rows, processor, *, per_device_batch_size, rank, num_processes, seed, augment, **_):
    samples = TrainSamples(rows, seed=seed, augment=augment)
    sampler = ShardedEpochBatchSampler(len(samples), per_device_batch_size=per_device_batch_size, rank=rank,
                                       num_processes=num_processes, seed=seed)
    return TrainData(samples, sampler, ProcessorCollator(processor))


def _grouped_train_data(rows, processor, *, per_device_batch_size, rank, num_processes, seed, augment,
                        sentences_per_image=DEFAULT_SENTENCES_PER_IMAGE, word_mask_rate=DEFAULT_WORD_MASK_RATE,
                        model_inputs=None, **_):
    b = sentences_per_image
    samples = GroupedTrainSamples(rows, sentences_per_image=b, word_mask_rate=word_mask_rate, seed=seed,
                                  augment=augment)
    if per_device_batch_size % b:
        raise ValueError(
            f"`per_device_train_batch_size` {per_device_batch_size} must be a multiple of `sentences_per_image` {b}: "
            f"the grouped_by_image sampler counts batch rows (sentences), b per image")
    images = per_device_batch_size // b
    if len(samples) < images * num_processes:
        raise ValueError(
            f"the training set ({len(samples)} images) is smaller than one global batch ({images} images "
            f"= {per_device_batch_size} rows / {b} sentences per image, x {num_processes} processes)")
    sampler = ShardedEpochBatchSampler(len(samples), per_device_batch_size=images, rank=rank,
                                       num_processes=num_processes, seed=seed)
    extra = GROUP_INPUTS if model_inputs is None else tuple(k for k in GROUP_INPUTS if k in model_inputs)
    return TrainData(samples, sampler, GroupedProcessorCollator(processor, extra_inputs=extra), rows_per_item=b)


TRAIN_SAMPLERS = {"random": _random_train_data, "grouped_by_image": _grouped_train_data}


def get_train_sampler(name: str) -> Callable:
    """The builder of training sampler `name` (`TRAIN_SAMPLERS`); `ValueError` naming the known ones."""
    if name not in TRAIN_SAMPLERS:
        raise ValueError(f"`MethodSpec.sampler` must be one of {sorted(TRAIN_SAMPLERS)}, got {name!r}")
    return TRAIN_SAMPLERS[name]


def build_train_data(sampler: str, rows, processor, *, per_device_batch_size: int, rank: int = 0,
                     num_processes: int = 1, seed: int = 0, augment: Optional[Callable] = None,
                     **options) -> TrainData:
    """The training set, batch sampler and collator of sampler `sampler` (`MethodSpec.sampler`).

    Args:
        rows: the training refs (`datasets.Dataset`, one row per ref).
        per_device_batch_size: batch rows per process and micro-batch (`per_device_train_batch_size`).
        options: sampler-specific; `"grouped_by_image"` reads `sentences_per_image`, `word_mask_rate`
            and `model_inputs` (`forward_input_names(model)`: which of `GROUP_INPUTS` the batch carries;
            `None` = all), `"random"` ignores them.
    """
    return get_train_sampler(sampler)(rows, processor, per_device_batch_size=per_device_batch_size, rank=rank,
                                      num_processes=num_processes, seed=seed, augment=augment, **options)
