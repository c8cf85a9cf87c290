"""Evaluation batches: every record once (`EvalLoader`)."""
import logging

import numpy as np

from jaxdet.data import transforms as T
from jaxdet.data.loader.batch import BatchMaker, check_positive, grain_iterator
from jaxdet.data.loader.index import index_info

log = logging.getLogger(__name__)


class EvalBatches:
  """Every record once: grouped by bucket, index order within a bucket, the last batch of a
  bucket padded with index -1 (``image_valid`` False)."""

  def __init__(self, bucket_of, num_buckets, global_batch, maker, process_index, per_process):
    rows, buckets = [], []
    for b in range(num_buckets):
      members = np.flatnonzero(np.asarray(bucket_of) == b)
      if not len(members):
        continue
      nb = -(-len(members) // global_batch)
      padded = np.full(nb * global_batch, -1, np.int64)
      padded[:len(members)] = members
      rows.append(padded.reshape(nb, global_batch))
      buckets.append(np.full(nb, b))
    self.rows = np.concatenate(rows) if rows else np.zeros((0, global_batch), np.int64)
    self.buckets = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    self.maker = maker
    self.lo, self.hi = process_index * per_process, (process_index + 1) * per_process

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, j):
    j = int(j)
    return self.maker(j, self.rows[j, self.lo:self.hi], int(self.buckets[j]),
                      np.arange(self.lo, self.hi))


class EvalLoader:
  """Every image of a source exactly once, in index order within each bucket; the last batch
  of each bucket is padded with ``image_valid=False`` images. Crowd boxes are left out of the
  gt arrays (they only matter to pycocotools).

  ``buckets``: the padded (H, W) shapes; ``bucket_of``: each record's index into them (default:
  the bucket closest in aspect ratio, `transforms.choose_bucket`). `build_eval_loader` passes
  the exact test shapes (``data.test_padding='exact'``) or the run's buckets.
  """

  def __init__(self, source, transform, *, buckets, samples_per_gpu, num_devices, max_gt,
               num_workers=0, prefetch=2, size_divisor=32, process_index=0, process_count=1,
               image_dtype=np.uint8, info=None, bucket_of=None):
    check_positive(samples_per_gpu=samples_per_gpu, num_devices=num_devices, max_gt=max_gt,
                   process_count=process_count)
    if len(source) == 0:
      raise ValueError("the evaluation dataset is empty")
    self.info = info if info is not None else index_info(source)
    self.buckets = [tuple(int(v) for v in b) for b in buckets]
    if bucket_of is None:
      bucket_of = [T.choose_bucket(h, w, self.buckets)
                   for h, w in zip(self.info.heights, self.info.widths)]
    bucket_of = np.asarray(bucket_of, np.int64).reshape(-1)
    if len(bucket_of) != len(source) or not np.all((0 <= bucket_of) & (bucket_of < len(buckets))):
      raise ValueError(f"bucket_of must give each of the {len(source)} records a bucket index "
                       f"in 0..{len(buckets) - 1}")
    per_process = num_devices * samples_per_gpu
    maker = BatchMaker(source, transform, buckets=self.buckets, num_devices=num_devices,
                       per_device=samples_per_gpu, max_gt=max_gt, size_divisor=size_divisor,
                       min_box_size=0.0, seed=0, image_dtype=image_dtype, train=False)
    self.seq = EvalBatches(bucket_of, len(self.buckets), per_process * process_count, maker,
                           process_index, per_process)
    self.num_workers, self.prefetch = num_workers, prefetch
    self.num_images = len(source)
    used = sorted(set(int(b) for b in self.seq.buckets))
    self.shapes = [(num_devices, samples_per_gpu, *self.buckets[b], 3) for b in used]
    log.info("evaluation data: %d images in %d batches, %d program(s): %s", self.num_images,
             len(self.seq), len(self.shapes), self.shapes)

  @property
  def num_programs(self):
    return len(self.shapes)

  def __len__(self):
    return len(self.seq)

  def __iter__(self):
    it = grain_iterator(self.seq, 0, self.num_workers, self.prefetch)
    try:
      for _ in range(len(self.seq)):
        yield next(it)
    finally:
      if hasattr(it, "close"):
        it.close()
