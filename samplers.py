"""Batch samplers for one process (rank) out of ``world_size``.

Evaluation: each rank reads a contiguous shard, in order; the shards are disjoint and together
cover every index exactly once (no padding duplicates), so gathered metrics are exact.

Training: one global index stream per epoch, the same on every rank:

* a permutation of the dataset drawn from ``np.random.default_rng([seed, epoch])``;
* with repeated augmentation (``repeats`` > 1, DeiT's ``RASampler``), each index is followed by its
  extra copies. Copy k of image i is yielded as index ``i + k * num_samples``: the dataset reads
  image ``index % len`` but seeds the augmentation with the full index, so the copies are
  augmented differently;
* the stream is cut to ``(num_samples // world_size) * world_size`` entries, so an epoch has as
  many samples as the dataset (with repeats: about num_samples / repeats distinct images);
* rank r takes entries r, r + world_size, r + 2 * world_size, ... (the copies of an image land on
  different ranks, as in DeiT) and forms full batches, dropping the incomplete last one.

Hence global batch b (the union of the ranks' b-th batches) is entries
[b * B * world_size, (b + 1) * B * world_size) of the stream, i.e. exactly the b-th batch that a
single process with batch size B * world_size sees. DeiT's RASampler differs in one detail: it
first rounds the dataset length down to a multiple of 256, which we skip so small datasets work.
"""
import numpy as np
import paddle


def _check_rank(rank, world_size):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'need 0 <= rank < world_size, got rank={rank}, world_size={world_size}')


class EvalBatchSampler(paddle.io.BatchSampler):
    """Indices [num_samples * rank // world_size, num_samples * (rank + 1) // world_size) in order,
    in batches of ``batch_size`` (the last one may be smaller)."""

    def __init__(self, num_samples, batch_size, rank=0, world_size=1):
        _check_rank(rank, world_size)
        self.indices = range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)
        self.batch_size = batch_size
        self.drop_last = False

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[start:start + self.batch_size])

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)


class TrainBatchSampler(paddle.io.BatchSampler):
    """Shuffled (optionally repeated) full batches of ``batch_size`` for ``rank``; see the module doc."""

    def __init__(self, num_samples, batch_size, seed, rank=0, world_size=1, repeats=1):
        _check_rank(rank, world_size)
        if repeats < 1:
            raise ValueError(f'repeats must be >= 1, got {repeats}')
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeats = repeats
        self.samples_per_rank = num_samples // world_size
        self.drop_last = True
        self.epoch = 0

    def set_epoch(self, epoch):
        """Selects the epoch's shuffle; call before iterating each epoch."""
        self.epoch = epoch

    def global_stream(self):
        """The epoch's index stream shared by all ranks, int64 (samples_per_rank * world_size,)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        copies = np.arange(self.repeats) * self.num_samples
        stream = (order[:, None] + copies[None, :]).reshape(-1)
        return stream[:self.samples_per_rank * self.world_size]

    def __iter__(self):
        mine = self.global_stream()[self.rank::self.world_size]
        for b in range(len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self):
        return self.samples_per_rank // self.batch_size
