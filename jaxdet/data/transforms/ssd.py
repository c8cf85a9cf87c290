"""SSD's training augmentation (mmdetection ``Expand`` and ``MinIoURandomCrop``); its colour
jitter is `jaxdet.data.transforms.photometric.PhotoMetricDistortion`."""
import numpy as np

from jaxdet.data.transforms.geometric import crop
from jaxdet.data.transforms.sample import select_boxes, shift_affine


class Expand:
  """SSD zoom-out (mmdet ``Expand``): with probability ``prob`` place the image at a random
  offset on a canvas ``ratio`` times larger (ratio uniform in ``ratio_range``) filled with
  ``mean`` (RGB, cast to the image dtype as mmdet does: 123.675 -> 123 for uint8)."""

  def __init__(self, mean, ratio_range=(1, 4), prob=0.5):
    if len(mean) != 3:
      raise ValueError(f"Expand mean must have 3 values (RGB), got {mean}")
    self.mean = np.asarray(mean, np.float64)
    self.min_ratio, self.max_ratio = ratio_range
    if not 1 <= self.min_ratio <= self.max_ratio:
      raise ValueError(f"Expand ratio_range must satisfy 1 <= lo <= hi, got {ratio_range}")
    self.prob = prob

  def __call__(self, sample, rng):
    if rng.uniform(0, 1) > self.prob:
      return sample
    img = sample["image"]
    h, w, c = img.shape
    ratio = rng.uniform(self.min_ratio, self.max_ratio)
    canvas = np.empty((int(h * ratio), int(w * ratio), c), img.dtype)
    canvas[...] = self.mean.astype(img.dtype)
    left = int(rng.uniform(0, w * ratio - w))
    top = int(rng.uniform(0, h * ratio - h))
    canvas[top:top + h, left:left + w] = img
    out = dict(sample)
    out["image"] = canvas
    out["boxes"] = sample["boxes"] + np.array([left, top, left, top], np.float32)
    out["affine"] = shift_affine(sample["affine"], left, top)
    return out


def _iou_patch(patch, boxes, eps=1e-6):
  """IoU of one box ``patch (4,)`` with ``boxes (n, 4)`` (mmdet ``bbox_overlaps``, float32)."""
  patch = patch.astype(np.float32)
  lt = np.maximum(patch[:2], boxes[:, :2])
  rb = np.minimum(patch[2:], boxes[:, 2:])
  wh = np.clip(rb - lt, 0, None)
  overlap = wh[:, 0] * wh[:, 1]
  area_p = (patch[2] - patch[0]) * (patch[3] - patch[1])
  area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return overlap / np.maximum(area_p + area_b - overlap, np.float32(eps))


class MinIoURandomCrop:
  """SSD random crop (mmdet ``MinIoURandomCrop``).

  Pick a mode from (1, *min_ious, 0); mode 1 keeps the image. Otherwise try up to 50 crops of
  width/height uniform in [min_crop_size, 1] x the image, aspect h/w in [0.5, 2]; accept one
  whose IoU with *every* box is >= the mode and that contains the centre of at least one box
  (strictly inside). Only boxes whose centres are inside survive, shifted and clipped. After 50
  failures a new mode is drawn (mmdet's loop). As in mmdet, the crop's left/top come from
  ``np.random.uniform(w - new_w)`` (= uniform between w - new_w and 1).
  """

  def __init__(self, min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3):
    if not 0 < min_crop_size <= 1:
      raise ValueError(f"min_crop_size must be in (0, 1], got {min_crop_size}")
    self.sample_mode = (1, *min_ious, 0)
    self.min_crop_size = min_crop_size

  def __call__(self, sample, rng):
    boxes = sample["boxes"]
    h, w = sample["image"].shape[:2]
    while True:
      mode = rng.choice(self.sample_mode)
      if mode == 1:
        return sample
      for _ in range(50):
        new_w = rng.uniform(self.min_crop_size * w, w)
        new_h = rng.uniform(self.min_crop_size * h, h)
        if new_h / new_w < 0.5 or new_h / new_w > 2:
          continue
        left = rng.uniform(w - new_w)
        top = rng.uniform(h - new_h)
        patch = np.array((int(left), int(top), int(left + new_w), int(top + new_h)))
        if patch[2] == patch[0] or patch[3] == patch[1]:
          continue
        if len(boxes):
          if _iou_patch(patch, boxes).min() < mode:
            continue
          cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
          cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
          inside = (cx > patch[0]) & (cy > patch[1]) & (cx < patch[2]) & (cy < patch[3])
          if not inside.any():
            continue
          sample = select_boxes(sample, inside)
        return crop(sample, patch)
