"""Training data for one process: shuffled batches on the device, resumable at any step."""

from __future__ import annotations

import math

import torch

from ..distributed import DistContext


class Batches:
    """Shuffled batches of (images in [0, 1], labels) for one process of one epoch.

    In-memory data sets (``ArrayDataset``) are sliced directly from their uint8
    tensor (moved to the device once when it is a GPU): no per-sample Python
    work. Other data sets (ImageFolder) go through a DataLoader. The order
    comes from a ``DistributedSampler`` seeded by ``(seed, epoch)``, so it is
    the same after a resume and is split between processes.
    """

    def __init__(self, dataset, batch_size: int, context: DistContext, seed: int, shuffle: bool,
                 workers: int = 0, limit: int | None = None):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        self.context, self.batch_size, self.shuffle, self.workers = context, batch_size, shuffle, workers
        self.count = len(dataset) if limit is None else min(limit, len(dataset))
        self.images = self.labels = None
        if hasattr(dataset, "images") and isinstance(getattr(dataset, "images"), torch.Tensor):
            images, labels = dataset.images[:self.count], dataset.labels[:self.count]
            on_gpu = context.device.type == "cuda" and images.numel() < 2**31
            self.images = images.to(context.device) if on_gpu else images
            self.labels = labels.to(context.device) if on_gpu else labels
            self.dataset = None
        else:
            self.dataset = dataset if limit is None else Subset(dataset, range(self.count))
        indexable = self.dataset if self.dataset is not None else range(self.count)
        if shuffle:
            self.sampler = DistributedSampler(indexable, num_replicas=context.world_size, rank=context.rank,
                                              shuffle=True, seed=seed)
        else:
            self.sampler = None
        self.loader = None
        if self.dataset is not None:
            sampler = self.sampler if shuffle else ShardSampler(self.count, context)
            self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                     pin_memory=context.device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            return torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        return torch.arange(self.context.rank, self.count, self.context.world_size)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        per_rank = (len(self.sampler) if self.shuffle
                    else len(range(self.context.rank, self.count, self.context.world_size)))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start: int = 0):
        """This epoch's batches from batch ``start`` on (a resumed epoch skips those it trained)."""
        from torch.utils.data import DataLoader

        device = self.context.device
        if self.loader is not None:
            loader = self.loader
            if start:
                remaining = list(iter(loader.sampler))[start * self.batch_size:]
                loader = DataLoader(loader.dataset, batch_size=self.batch_size, sampler=remaining,
                                    num_workers=self.workers, pin_memory=device.type == "cuda")
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return
        indices = self._indices().to(self.images.device)
        for begin in range(start * self.batch_size, len(indices), self.batch_size):
            idx = indices[begin:begin + self.batch_size]
            x = self.images[idx].to(device, non_blocking=True).float().div_(255)
            yield x, self.labels[idx].to(device, non_blocking=True)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: each test image on exactly one process."""

    def __init__(self, count: int, context: DistContext):
        self.indices = list(range(context.rank, count, context.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
