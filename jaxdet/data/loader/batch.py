"""One static-shape batch from record indices (`BatchMaker`), and the grain plumbing that
streams batches from worker processes."""
import grain
import numpy as np

from jaxdet.data import transforms as T


def batch_rng(seed, batch_index, slot):
  """The transforms' RandomState for one image slot of one batch."""
  return np.random.RandomState(np.random.MT19937(np.random.SeedSequence(
      [int(seed), int(batch_index), int(slot)])))


class BatchMaker:
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
      sample = self.transform(sample, batch_rng(self.seed, batch_index, slot))
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


def _ensure_absl_flags():
  """grain's worker processes read absl flags; mark them parsed when the program did not."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def grain_iterator(seq, start, num_workers, prefetch):
  """An iterator over ``seq[start:]`` (a random-access sequence of batches), read by one
  prefetching thread, or by ``num_workers`` processes when > 0."""
  ds = grain.MapDataset.source(seq)
  if start:
    ds = ds[start:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 1)))
  if num_workers > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
  return iter(ds)


def check_positive(**kw):
  """``ValueError`` naming the first keyword argument that is not a positive integer."""
  for k, v in kw.items():
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{k} must be a positive integer, got {v!r}")
