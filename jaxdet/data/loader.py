"""Batches with static shapes from a random-access source, on grain.

``jit`` compiles one program per input shape, so every batch is padded into one of a few
*buckets* (`jaxdet.data.transforms.bucket_shapes`: landscape and portrait at the config's
scale, multiples of ``size_divisor``) and a batch holds images of a single bucket. A training
batch is a dict of numpy arrays with a leading device axis::

  image        (D, B, H, W, 3) uint8 RGB, zero-padded at the bottom/right
  gt_boxes     (D, B, G, 4) float32 xyxy input pixels   (G = data.max_gt; padding rows 0)
  gt_labels    (D, B, G) int32;  gt_mask (D, B, G) bool
  img_shape    (D, B, 2) int32 (h, w) after resize, before padding
  pad_shape    (D, B, 2) int32 img_shape rounded up to size_divisor (mmdet's pad_shape)
  scale_factor (D, B, 2) float32 (w, h);  offset (D, B, 2) float32;  flip (D, B) bool
  orig_size    (D, B, 2) int32 (h, w);    image_id (D, B) int32
  image_valid  (D, B) bool: False for the padding of the last evaluation batch and for images
               the source could not read (``data.skip_bad_images``); such slots are all zero
  num_gt_dropped (D, B) int32: targets beyond max_gt that did not fit (counted, reported)

Training order: epoch ``e`` is a permutation drawn from ``(seed, e)`` alone; within it the
images are grouped by bucket (like mmdet's GroupSampler: each group padded to a multiple of
the global batch by repeating its first images), and the batches of all groups are shuffled.
Batch ``j`` -- its images and every random decision of its transforms, seeded by
``(seed, j, slot)`` -- depends on nothing else, so any number of workers gives the same
stream, and an iterator's state is just the index of the next batch.

Workers: ``grain.MapDataset`` over batch indices -> ``to_iter_dataset`` (one reader thread
prefetching) -> ``mp_prefetch`` with ``num_workers`` processes (each builds whole batches;
grain interleaves them in order).
"""
import dataclasses
import logging

import grain
import numpy as np

from jaxdet.data import transforms as T

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ----------------------------------------------------------------------------- index info

@dataclasses.dataclass(frozen=True)
class IndexInfo:
  """Per-record facts the loader needs before decoding anything.

  heights, widths: (N,) int original image size;  num_targets: (N,) int count of non-crowd
  boxes at least 1 px wide and high (mmdet's annotation filter).
  """
  heights: np.ndarray
  widths: np.ndarray
  num_targets: np.ndarray


def index_info(source):
  """`IndexInfo` of a source: its ``index_info()`` method if it has one (no decoding), else
  read every record once (decodes every image: slow for large datasets)."""
  if hasattr(source, "index_info"):
    info = source.index_info()
    if not isinstance(info, IndexInfo):
      info = IndexInfo(**{k: np.asarray(info[k]) for k in ("heights", "widths", "num_targets")})
    if not len(info.heights) == len(info.widths) == len(info.num_targets) == len(source):
      raise ValueError(f"source.index_info() describes {len(info.heights)} records but the "
                       f"source has {len(source)}")
    return info
  n = len(source)
  if n > 2000:
    log.warning("source %s has no index_info(): decoding all %d images to find their sizes",
                type(source).__name__, n)
  hs, ws, nt = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
  for i in range(n):
    rec = source[i]
    if rec is None:  # unreadable (data.skip_bad_images): no targets, so never trained on
      hs[i], ws[i] = 1, 1
      continue
    hs[i], ws[i] = rec.get("orig_size", np.shape(rec["image"])[:2])
    b = np.asarray(rec["boxes"], np.float32).reshape(-1, 4)
    crowd = np.asarray(rec.get("crowd", np.zeros(len(b), bool)), bool).reshape(len(b))
    nt[i] = np.sum(~crowd & (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1))
  return IndexInfo(hs, ws, nt)


# ----------------------------------------------------------------------------- batch assembly

def _rng(seed, batch_index, slot):
  """The transforms' RandomState for one image slot of one batch."""
  return np.random.RandomState(np.random.MT19937(np.random.SeedSequence(
      [int(seed), int(batch_index), int(slot)])))


class _BatchMaker:
  """Loads, transforms and pads the images of one batch into fixed-shape arrays.

  Picklable (it travels to the worker processes with the source and the transform).
  """

  def __init__(self, source, transform, *, buckets, num_devices, per_device, max_gt,
               size_divisor, min_box_size, seed, image_dtype, train):
    self.source, self.transform, self.buckets = source, transform, buckets
    self.num_devices, self.per_device, self.max_gt = num_devices, per_device, max_gt
    self.size_divisor, self.min_box_size = size_divisor, min_box_size
    self.seed, self.image_dtype, self.train = seed, np.dtype(image_dtype), train

  def __call__(self, batch_index, indices, bucket, slots):
    """indices: (n,) record indices (-1 = padding image); slots: (n,) positions in the global
    batch (they seed the random transforms)."""
    n = len(indices)
    hb, wb = self.buckets[bucket]
    g = self.max_gt
    out = dict(
        image=np.zeros((n, hb, wb, 3), self.image_dtype),
        gt_boxes=np.zeros((n, g, 4), np.float32),
        gt_labels=np.zeros((n, g), np.int32),
        gt_mask=np.zeros((n, g), bool),
        img_shape=np.zeros((n, 2), np.int32),
        pad_shape=np.zeros((n, 2), np.int32),
        scale_factor=np.ones((n, 2), np.float32),
        offset=np.zeros((n, 2), np.float32),
        flip=np.zeros((n,), bool),
        orig_size=np.zeros((n, 2), np.int32),
        image_id=np.full((n,), -1, np.int32),
        image_valid=np.zeros((n,), bool),
        num_gt_dropped=np.zeros((n,), np.int32),
    )
    for k, (idx, slot) in enumerate(zip(indices, slots)):
      if idx < 0:
        continue
      record = self.source[int(idx)]
      if record is None:  # unreadable image with data.skip_bad_images: an invalid slot
        continue
      sample = T.make_sample(record)
      before = sample
      sample = self.transform(sample, _rng(self.seed, batch_index, slot))
      if sample is None:  # a crop without boxes and allow_negative_crop=False
        sample = T.select_boxes(before, np.zeros(len(before["boxes"]), bool))
      sample = T.fit_into(sample, (hb, wb))
      if self.train:
        sample = T.training_targets(sample, min_size=self.min_box_size)
      else:
        sample = T.select_boxes(sample, ~sample["crowd"])
      img = sample["image"]
      if img.dtype != self.image_dtype:
        raise ValueError(f"transform produced a {img.dtype} image but batches are "
                         f"{self.image_dtype} (data.pipeline.photometric_uint8?)")
      h, w = img.shape[:2]
      out["image"][k, :h, :w] = img
      m = min(len(sample["boxes"]), g)
      out["gt_boxes"][k, :m] = sample["boxes"][:m]
      out["gt_labels"][k, :m] = sample["labels"][:m]
      out["gt_mask"][k, :m] = True
      out["num_gt_dropped"][k] = len(sample["boxes"]) - m
      meta = T.sample_meta(sample)
      out["img_shape"][k] = meta["img_shape"]
      d = self.size_divisor
      out["pad_shape"][k] = [min(-(-h // d) * d, hb), min(-(-w // d) * d, wb)]
      out["scale_factor"][k] = meta["scale_factor"]
      out["offset"][k] = meta["offset"]
      out["flip"][k] = meta["flip"]
      out["orig_size"][k] = meta["orig_size"]
      if not -2**31 <= meta["image_id"] < 2**31:
        raise ValueError(f"image_id {meta['image_id']} does not fit in int32")
      out["image_id"][k] = meta["image_id"]
      out["image_valid"][k] = True
    return {k: v.reshape(self.num_devices, self.per_device, *v.shape[1:])
            for k, v in out.items()}


# ----------------------------------------------------------------------------- schedules

class _TrainSchedule:
  """Epoch-seeded, bucket-grouped order of training batches (global, all processes)."""

  def __init__(self, bucket_of, valid, global_batch, seed, num_buckets):
    self.bucket_of = np.asarray(bucket_of)
    self.valid = np.flatnonzero(valid)
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


class _TrainBatches:
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


class _EvalBatches:
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


# ----------------------------------------------------------------------------- grain plumbing

def _ensure_absl_flags():
  """grain's worker processes read absl flags; mark them parsed when the program did not."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _grain_iterator(seq, start, num_workers, prefetch):
  ds = grain.MapDataset.source(seq)
  if start:
    ds = ds[start:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 1)))
  if num_workers > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
  return iter(ds)


def _check_positive(**kw):
  for k, v in kw.items():
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{k} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- loaders

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
    num_epochs: None for an endless stream.
    process_index, process_count: multi-host sharding of each global batch.
    image_dtype: uint8 (or float32 for mmdet's unclipped photometric distortion).
    info: precomputed `IndexInfo` (default: `index_info(source)`).
  """

  def __init__(self, source, transform, *, buckets, samples_per_gpu, num_devices, max_gt,
               seed=0, num_workers=0, prefetch=2, size_divisor=32, min_box_size=1.0,
               drop_empty=True, num_epochs=None, process_index=0, process_count=1,
               image_dtype=np.uint8, info=None):
    _check_positive(samples_per_gpu=samples_per_gpu, num_devices=num_devices, max_gt=max_gt,
                    process_count=process_count)
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
    self.schedule = _TrainSchedule(bucket_of, valid, self.global_batch, seed,
                                   len(self.buckets))
    self.maker = _BatchMaker(source, transform, buckets=self.buckets, num_devices=num_devices,
                             per_device=samples_per_gpu, max_gt=max_gt,
                             size_divisor=size_divisor, min_box_size=min_box_size, seed=seed,
                             image_dtype=image_dtype, train=True)
    self.seed, self.num_workers, self.prefetch = seed, num_workers, prefetch
    self.num_devices, self.samples_per_gpu = num_devices, samples_per_gpu
    self.process_index = process_index
    bpe = self.batches_per_epoch
    self.length = bpe * num_epochs if num_epochs is not None else bpe * 10**9
    log.info("training data: %d images (%d without targets skipped), %d batches/epoch, "
             "compiles %d program(s): %s", int(valid.sum()), self.num_dropped_images, bpe,
             self.num_programs, self.shapes)

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
    return _TrainBatches(self.schedule, self.maker, self.length, self.process_index,
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
    seq = _TrainBatches(ld.schedule, ld.maker, ld.length, ld.process_index, ld.per_process)
    self._it = _grain_iterator(seq, self.next_batch, ld.num_workers, ld.prefetch)

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


class EvalLoader:
  """Every image of a source exactly once, in index order within each bucket; the last batch
  of each bucket is padded with ``image_valid=False`` images. Crowd boxes are left out of the
  gt arrays (they only matter to pycocotools)."""

  def __init__(self, source, transform, *, buckets, samples_per_gpu, num_devices, max_gt,
               num_workers=0, prefetch=2, size_divisor=32, process_index=0, process_count=1,
               image_dtype=np.uint8, info=None):
    _check_positive(samples_per_gpu=samples_per_gpu, num_devices=num_devices, max_gt=max_gt,
                    process_count=process_count)
    if len(source) == 0:
      raise ValueError("the evaluation dataset is empty")
    self.info = info if info is not None else index_info(source)
    self.buckets = [tuple(int(v) for v in b) for b in buckets]
    bucket_of = [T.choose_bucket(h, w, self.buckets)
                 for h, w in zip(self.info.heights, self.info.widths)]
    per_process = num_devices * samples_per_gpu
    maker = _BatchMaker(source, transform, buckets=self.buckets, num_devices=num_devices,
                        per_device=samples_per_gpu, max_gt=max_gt, size_divisor=size_divisor,
                        min_box_size=0.0, seed=0, image_dtype=image_dtype, train=False)
    self.seq = _EvalBatches(bucket_of, len(self.buckets), per_process * process_count, maker,
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
    it = _grain_iterator(self.seq, 0, self.num_workers, self.prefetch)
    try:
      for _ in range(len(self.seq)):
        yield next(it)
    finally:
      if hasattr(it, "close"):
        it.close()


# ----------------------------------------------------------------------------- from config

def _image_dtype(pipeline):
  if pipeline.get("kind", "standard") == "ssd" and not pipeline.get("photometric_uint8", True):
    return np.float32
  return np.uint8


def _devices(num_devices):
  if num_devices is None:
    import jax  # pylint: disable=import-outside-toplevel
    num_devices = jax.local_device_count()
  return num_devices


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


def build_train_loader(data, source, *, seed=0, num_devices=None, num_epochs=None,
                       process_index=None, process_count=None, info=None):
  """`TrainLoader` from the ``config.data`` ConfigDict (see ``configs/_base_/data.py``)."""
  p = data.pipeline
  process_index, process_count = _process(process_index, process_count)
  return TrainLoader(
      source, T.build_train_transform(p, tuple(data.img_scale)),
      buckets=T.bucket_shapes(p, tuple(data.img_scale), train=True,
                              buckets=data.get("buckets", ())),
      samples_per_gpu=data.samples_per_gpu, num_devices=_devices(num_devices),
      max_gt=data.max_gt, seed=seed, num_workers=data.workers_per_gpu,
      prefetch=data.get("prefetch", 2), size_divisor=p.get("size_divisor", 32),
      min_box_size=p.get("min_box_size", 1.0), num_epochs=num_epochs,
      process_index=process_index, process_count=process_count,
      image_dtype=_image_dtype(p), info=info)


def build_eval_loader(data, source, *, num_devices=None, process_index=None,
                      process_count=None, info=None):
  """`EvalLoader` from ``config.data`` (batch ``data.val.samples_per_gpu``)."""
  p = data.pipeline
  process_index, process_count = _process(process_index, process_count)
  return EvalLoader(
      source, T.build_test_transform(p, tuple(data.img_scale)),
      buckets=T.bucket_shapes(p, tuple(data.img_scale), train=False,
                              buckets=data.get("buckets", ())),
      samples_per_gpu=data.val.get("samples_per_gpu", data.samples_per_gpu),
      num_devices=_devices(num_devices), max_gt=data.max_gt,
      num_workers=data.workers_per_gpu, prefetch=data.get("prefetch", 2),
      size_divisor=p.get("size_divisor", 32), process_index=process_index,
      process_count=process_count, image_dtype=np.uint8, info=info)


def count_programs(data, *, num_devices, train=True):
  """Upper bound on the distinct batch shapes (= jit programs) from the config alone:
  one per bucket. `TrainLoader.shapes` gives the exact list for a given dataset."""
  _check_positive(num_devices=num_devices)
  return len(T.bucket_shapes(data.pipeline, tuple(data.img_scale), train=train,
                             buckets=data.get("buckets", ())))
