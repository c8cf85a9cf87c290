"""Training batches: the epoch-seeded, bucket-grouped schedule (`TrainSchedule`), the loader
(`TrainLoader`) and its resumable iterator (`TrainIterator`)."""
import logging

import numpy as np

from jaxdet.data import transforms as T
from jaxdet.data.loader.batch import BatchMaker, check_positive, grain_iterator
from jaxdet.data.loader.index import index_info

log = logging.getLogger(__name__)

STATE_VERSION = 1


class TrainSchedule:
  """Epoch-seeded, bucket-grouped order of training batches (global, all processes).

  ``repeat`` R > 1 is mmdetection's ``RepeatDataset(times=R)``: one epoch is the dataset listed R
  times and shuffled as one (so an image may come twice before another comes once)."""

  def __init__(self, bucket_of, valid, global_batch, seed, num_buckets, repeat=1):
    self.bucket_of = np.asarray(bucket_of)
    self.valid = np.tile(np.flatnonzero(valid), repeat)
    self.global_batch, self.seed, self.num_buckets = global_batch, seed, num_buckets
    counts = np.bincount(self.bucket_of[self.valid], minlength=num_buckets)
    self.bucket_counts = counts
    self.batches_per_epoch = int(sum(-(-c // global_batch) for c in counts))
    self._cache = (None, None)

  def epoch(self, e):
    """(indices (bpe, GB) int64, bucket (bpe,) int64) of epoch ``e``."""
    if self._cache[0] == e:
      return self._cache[1]
    rng = np.random.default_rng([self.seed, e])
    perm = rng.permutation(self.valid)
    rows, buckets = [], []
    for b in range(self.num_buckets):
      members = perm[self.bucket_of[perm] == b]
      if not len(members):
        continue
      nb = -(-len(members) // self.global_batch)
      rows.append(np.resize(members, nb * self.global_batch).reshape(nb, self.global_batch))
      buckets.append(np.full(nb, b))
    rows, buckets = np.concatenate(rows), np.concatenate(buckets)
    order = rng.permutation(len(rows))
    result = (rows[order], buckets[order])
    self._cache = (e, result)
    return result

  def batch(self, j):
    rows, buckets = self.epoch(j // self.batches_per_epoch)
    r = j % self.batches_per_epoch
    return rows[r], int(buckets[r])


class TrainBatches:
  """Random-access sequence of this process's training batches (grain source)."""

  def __init__(self, schedule, maker, length, process_index, per_process):
    self.schedule, self.maker, self.length = schedule, maker, length
    self.lo = process_index * per_process
    self.hi = self.lo + per_process

  def __len__(self):
    return self.length

  def __getitem__(self, j):
    indices, bucket = self.schedule.batch(int(j))
    slots = np.arange(self.lo, self.hi)
    return self.maker(int(j), indices[self.lo:self.hi], bucket, slots)


class TrainLoader:
  """Endless (or ``num_epochs``-long) stream of static-shape training batches.

  Args:
    source: random-access source (``len``, ``source[i]`` -> record dict).
    transform: ``(sample, RandomState) -> sample`` (`transforms.build_train_transform`).
    buckets: list of (H, W) padded shapes (`transforms.bucket_shapes`).
    samples_per_gpu: B;  num_devices: D (local devices);  max_gt: G.
    seed: shuffle and augmentation seed.
    num_workers: grain worker processes (0 = a reader thread in this process).
    prefetch: batches buffered per worker (or by the reader thread).
    size_divisor: for ``pad_shape``;  min_box_size: targets narrower/lower are dropped.
    drop_empty: skip images without targets (non-crowd boxes >= 1 px) when building epochs.
    repeat: passes over the data per epoch (mmdetection's ``RepeatDataset``), >= 1.
    num_epochs: None for an endless stream.
    process_index, process_count: multi-host sharding of each global batch.
    image_dtype: uint8 (or float32 for mmdet's unclipped photometric distortion).
    info: precomputed `IndexInfo` (default: `index_info(source)`).
  """

  def __init__(self, source, transform, *, buckets, samples_per_gpu, num_devices, max_gt,
               seed=0, num_workers=0, prefetch=2, size_divisor=32, min_box_size=1.0,
               drop_empty=True, num_epochs=None, process_index=0, process_count=1,
               image_dtype=np.uint8, info=None, repeat=1):
    check_positive(samples_per_gpu=samples_per_gpu, num_devices=num_devices, max_gt=max_gt,
                   process_count=process_count, repeat=repeat)
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not buckets:
      raise ValueError("buckets must list at least one (H, W) shape")
    self.info = info if info is not None else index_info(source)
    self.buckets = [tuple(int(v) for v in b) for b in buckets]
    bucket_of = np.array([T.choose_bucket(h, w, self.buckets)
                          for h, w in zip(self.info.heights, self.info.widths)], np.int64)
    valid = self.info.num_targets > 0 if drop_empty else np.ones(len(bucket_of), bool)
    if not valid.any():
      raise ValueError(f"no training image has a usable box (of {len(bucket_of)} images)")
    self.num_dropped_images = int(np.sum(~valid))
    self.per_process = num_devices * samples_per_gpu
    self.global_batch = self.per_process * process_count
    self.repeat = repeat
    self.schedule = TrainSchedule(bucket_of, valid, self.global_batch, seed,
                                  len(self.buckets), repeat)
    self.maker = BatchMaker(source, transform, buckets=self.buckets, num_devices=num_devices,
                            per_device=samples_per_gpu, max_gt=max_gt,
                            size_divisor=size_divisor, min_box_size=min_box_size, seed=seed,
                            image_dtype=image_dtype, train=True)
    self.seed, self.num_workers, self.prefetch = seed, num_workers, prefetch
    self.num_devices, self.samples_per_gpu = num_devices, samples_per_gpu
    self.process_index = process_index
    bpe = self.batches_per_epoch
    self.length = bpe * num_epochs if num_epochs is not None else bpe * 10**9
    log.info("training data: %d images (%d without targets skipped)%s, %d batches/epoch, "
             "compiles %d program(s): %s", int(valid.sum()), self.num_dropped_images,
             f", each epoch {repeat} passes over them (data.repeat, mmdetection's "
             f"RepeatDataset)" if repeat > 1 else "", bpe, self.num_programs, self.shapes)

  @property
  def batches_per_epoch(self):
    return self.schedule.batches_per_epoch

  @property
  def shapes(self):
    """Distinct image shapes (D, B, H, W, 3) the stream contains: one jit program each."""
    used = [b for b, c in zip(self.buckets, self.schedule.bucket_counts) if c]
    return [(self.num_devices, self.samples_per_gpu, h, w, 3) for h, w in used]

  @property
  def num_programs(self):
    return len(self.shapes)

  def batch(self, j):
    """Batch ``j`` of the stream, computed directly (no workers)."""
    return TrainBatches(self.schedule, self.maker, self.length, self.process_index,
                        self.per_process)[j]

  def iterator(self, state=None):
    """A `TrainIterator` from the start, or from a state saved by ``get_state()``."""
    it = TrainIterator(self)
    if state is not None:
      it.set_state(state)
    return it

  def __iter__(self):
    return self.iterator()


class TrainIterator:
  """Iterator over `TrainLoader` batches whose state is a small JSON-able dict.

  ``get_state()`` -> ``{'version', 'next_batch', 'seed', 'global_batch',
  'batches_per_epoch'}``; ``set_state`` continues with exactly the batch that would have come
  next. ``stats`` counts targets dropped by ``max_gt`` and unreadable images skipped.
  """

  def __init__(self, loader):
    self.loader = loader
    self.next_batch = 0
    self.stats = dict(gt_dropped=0, images_with_gt_dropped=0, images_skipped=0)
    self._it = None

  @property
  def epoch(self):
    return self.next_batch // self.loader.batches_per_epoch

  def _start(self):
    ld = self.loader
    seq = TrainBatches(ld.schedule, ld.maker, ld.length, ld.process_index, ld.per_process)
    self._it = grain_iterator(seq, self.next_batch, ld.num_workers, ld.prefetch)

  def __iter__(self):
    return self

  def __next__(self):
    if self.next_batch >= self.loader.length:
      raise StopIteration
    if self._it is None:
      self._start()
    batch = next(self._it)
    self.next_batch += 1
    self.stats["images_skipped"] += int((~batch["image_valid"]).sum())
    dropped = batch["num_gt_dropped"]
    if dropped.any():
      if not self.stats["gt_dropped"]:
        log.warning("data.max_gt=%d is too small: batch %d drops %d targets (counted in "
                    "iterator.stats)", self.loader.maker.max_gt, self.next_batch - 1,
                    int(dropped.sum()))
      self.stats["gt_dropped"] += int(dropped.sum())
      self.stats["images_with_gt_dropped"] += int((dropped > 0).sum())
    return batch

  def get_state(self):
    ld = self.loader
    return dict(version=STATE_VERSION, next_batch=int(self.next_batch), seed=int(ld.seed),
                global_batch=int(ld.global_batch), batches_per_epoch=int(ld.batches_per_epoch))

  def set_state(self, state):
    ld = self.loader
    expect = dict(version=STATE_VERSION, seed=int(ld.seed), global_batch=int(ld.global_batch),
                  batches_per_epoch=int(ld.batches_per_epoch))
    for k, v in expect.items():
      if k not in state:
        raise ValueError(f"loader state lacks {k!r}: {state}")
      if int(state[k]) != v:
        raise ValueError(f"loader state has {k}={state[k]} but this loader has {k}={v} "
                         "(different seed, batch size or dataset?)")
    self.close()
    self.next_batch = int(state["next_batch"])

  def close(self):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
