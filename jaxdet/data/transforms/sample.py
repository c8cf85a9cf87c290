"""The sample dict the transforms pass along (see `jaxdet.data.transforms`) and its bookkeeping:
making one from a source record, selecting boxes, the affine map back to the original image."""
import numpy as np


def make_sample(record):
  """A source record (see `jaxdet.data.sources`) -> a fresh sample dict (arrays copied)."""
  image = np.asarray(record["image"])
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image of record {record.get('image_id')} has shape {image.shape}, "
                     "expected (H, W, 3) RGB")
  boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
  n = len(boxes)
  crowd = record.get("crowd")
  return dict(
      image=image,
      boxes=boxes.copy(),
      labels=np.asarray(record["labels"], np.int32).reshape(n),
      crowd=np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool).reshape(n),
      image_id=int(record["image_id"]),
      orig_size=tuple(int(v) for v in record.get("orig_size", image.shape[:2])),
      affine=np.array([[1.0, 0.0], [1.0, 0.0]]),
  )


def select_boxes(sample, keep):
  """The sample with only the boxes (and their labels / crowd flags) where ``keep`` holds."""
  out = dict(sample)
  for k in ("boxes", "labels", "crowd"):
    out[k] = sample[k][keep]
  return out


def scale_affine(affine, w_scale, h_scale):
  """``affine`` after scaling the image by (w_scale, h_scale)."""
  return affine * np.array([[w_scale], [h_scale]])


def shift_affine(affine, dx, dy):
  """``affine`` after moving the image content by (dx, dy) pixels."""
  return affine + np.array([[0.0, dx], [0.0, dy]])


def sample_meta(sample):
  """The bookkeeping that maps boxes back to the original image.

  Returns dict(scale_factor (2,) float32 (w, h), offset (2,) float32 (x, y), flip bool,
  img_shape (2,) int32 (h, w) of the image before padding, orig_size (2,) int32 (h, w),
  image_id int).  A point x of the original image lies at ``sx * x + ox`` of the resized
  image, mirrored to ``img_w - (sx * x + ox)`` when ``flip``; offsets are 0 unless an Expand
  or a crop ran, so for the standard pipeline these are mmdetection's scale_factor / flip.
  """
  (ax, bx), (ay, by) = sample["affine"]
  h, w = sample["image"].shape[:2]
  flip = ax < 0
  return dict(
      scale_factor=np.array([abs(ax), ay], np.float32),
      offset=np.array([w - bx if flip else bx, by], np.float32),
      flip=bool(flip),
      img_shape=np.array([h, w], np.int32),
      orig_size=np.array(sample["orig_size"], np.int32),
      image_id=sample["image_id"],
  )


def training_targets(sample, *, min_size=1.0):
  """Drop crowd boxes and boxes narrower or lower than ``min_size`` pixels (after transforms).

  Returns the sample with only the boxes that are training targets.
  """
  b = sample["boxes"]
  keep = ~sample["crowd"] & (b[:, 2] - b[:, 0] >= min_size) & (b[:, 3] - b[:, 1] >= min_size)
  return select_boxes(sample, keep)
