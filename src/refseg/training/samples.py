"""Deterministic training and evaluation samples.

Every random choice of a training sample (which sentence of the ref, the augmentation) is a pure
function of `(seed, epoch, index)`, and the shuffling of an epoch is a pure function of
`(seed, epoch)`. So a resumed run, a run with DataLoader workers and a run split over several
processes see exactly the samples an uninterrupted single-process run sees.
"""

import math
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
