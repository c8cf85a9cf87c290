"""Static shapes: the padded (H, W) buckets of a run, the bucket of an image, padding to a
multiple of the size divisor, and shrinking an image that would not fit its bucket.

Two ways to pad test images (``data.test_padding``):
  'exact':   as mmdetection pads them (``DetDataPreprocessor(pad_size_divisor)`` with one image
             per batch): each image to the multiple of ``size_divisor`` above its resized size,
             `exact_test_shapes`; a batch then holds images of one such shape only.
  'buckets': into the run's few `bucket_shapes`, like training (fewer programs to compile, but
             a model with GroupNorm in its head, or any statistic over the padded map, gives
             other outputs than mmdetection's for images that do not fill their bucket).
"""
import math

import numpy as np

from jaxdet.data.transforms.detr import detr_scales
from jaxdet.data.transforms.geometric import rescale_size, resize_to


def ceil_to(x, d):
  """``x`` rounded up to a multiple of ``d``."""
  return int(math.ceil(x / d) * d)


def fit_into(sample, shape, backend="pillow"):
  """Shrink (keep ratio) an image that does not fit ``shape = (H, W)``; else unchanged.

  A safety net for buckets: standard pipelines always fit theirs; DETR's crop branch can turn
  a landscape image portrait, which then gets scaled down to fit its bucket.
  """
  h, w = sample["image"].shape[:2]
  if h <= shape[0] and w <= shape[1]:
    return sample
  (nw, nh), _ = rescale_size((w, h), min(shape[0] / h, shape[1] / w))
  return resize_to(sample, min(nw, shape[1]), min(nh, shape[0]), backend)


def pad_to_multiple(image, divisor):
  """Zero-pad ``image (h, w, C)`` at the bottom/right to multiples of ``divisor`` (mmdet Pad)."""
  h, w = image.shape[:2]
  ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
  return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))


def bucket_shapes(pipeline, img_scale, *, train=True, buckets=()):
  """The padded (H, W) shapes a run's batches use: landscape first, then portrait.

  Every resized image fits its bucket: keep-ratio resizes to (long, short) give
  (ceil(short), ceil(long)) and its transpose, rounded up to ``size_divisor``; fixed-size
  resizes (SSD) give one bucket. A non-empty ``buckets`` (``data.buckets``, a list of (H, W))
  is used as given.
  """
  if buckets:
    return [tuple(int(v) for v in b) for b in buckets]
  kind = pipeline.get("kind", "standard")
  d = int(pipeline.get("size_divisor", 32))
  if kind == "ssd" or not pipeline.get("keep_ratio", True):
    return [(ceil_to(img_scale[1], d), ceil_to(img_scale[0], d))]
  scales = [tuple(img_scale)]
  if train and kind == "standard" and pipeline.get("multiscale"):
    scales = [tuple(s) for s in pipeline.get("multiscale")]
  if train and kind == "detr":
    scales = detr_scales(pipeline.get("detr_short_sides", range(480, 801, 32)),
                          pipeline.get("detr_max_size", 1333))
  long_side = max(max(s) for s in scales)
  short_side = max(min(s) for s in scales)
  land = (ceil_to(short_side, d), ceil_to(long_side, d))
  return [land] if land[0] == land[1] else [land, land[::-1]]


def choose_bucket(h, w, buckets):
  """Index of the bucket whose aspect ratio is closest to an (h, w) image (ties: first)."""
  if len(buckets) == 1:
    return 0
  r = math.log(w / h)
  return int(np.argmin([abs(math.log(bw / bh) - r) for bh, bw in buckets]))


def exact_test_shapes(resize, divisor, heights, widths):
  """(N, 2) int64 padded (H, W) of (h, w) images at test time, as mmdetection pads them: the
  size ``resize`` (a `Resize`) gives each, rounded up to a multiple of ``divisor``. Needs only
  the original sizes (e.g. an annotation file's), not the images."""
  out = np.zeros((len(heights), 2), np.int64)
  for i, (h, w) in enumerate(zip(heights, widths)):
    nh, nw = resize.output_size(int(h), int(w))
    out[i] = ceil_to(nh, divisor), ceil_to(nw, divisor)
  return out


def possible_test_shapes(resize, divisor):
  """Every padded (H, W) that `exact_test_shapes` can give with this ``resize``, sorted.

  Keep-ratio resizing to (long, short) leaves the short side at ``short`` or the long side at
  ``long``, so landscape images pad to (ceil(short), W) with W up to ceil(long), or to
  (H, ceil(long)) with H up to ceil(short); portrait ones to the transposes. A fixed-size
  resize (SSD) gives one shape.
  """
  if not resize.keep_ratio:
    return [(ceil_to(resize.scale[1], divisor), ceil_to(resize.scale[0], divisor))]
  short, long_ = ceil_to(min(resize.scale), divisor), ceil_to(max(resize.scale), divisor)
  land = {(short, w) for w in range(short, long_ + 1, divisor)}
  land |= {(h, long_) for h in range(divisor, short + 1, divisor)}
  return sorted(land | {(w, h) for h, w in land})
