"""DETR's training augmentation: mmdetection's absolute-range ``RandomCrop`` and the
multi-scale (short side, max size) scales."""
from jaxdet.data.transforms.geometric import crop
from jaxdet.data.transforms.sample import select_boxes


def detr_scales(short_sides, max_size):
  """[(short, max_size), ...]: RandomChoiceResize scales, one per short side in ``short_sides``."""
  return [(int(s), int(max_size)) for s in short_sides]


class RandomCrop:
  """mmdet ``RandomCrop(crop_type='absolute_range')`` as used by DETR: crop height and width
  each uniform integers in [min(size, lo), min(size, hi)], random offset; boxes shifted,
  clipped, and those left outside dropped. With ``allow_negative_crop=False`` a crop without
  boxes returns None (mmdet then re-samples the image; the loader treats None as no boxes)."""

  def __init__(self, crop_size=(384, 600), allow_negative_crop=True):
    lo, hi = crop_size
    if not 0 < lo <= hi:
      raise ValueError(f"crop_size must be (lo, hi) with 0 < lo <= hi, got {crop_size}")
    self.lo, self.hi, self.allow_negative_crop = int(lo), int(hi), allow_negative_crop

  def __call__(self, sample, rng):
    h, w = sample["image"].shape[:2]
    crop_h = rng.randint(min(h, self.lo), min(h, self.hi) + 1)
    crop_w = rng.randint(min(w, self.lo), min(w, self.hi) + 1)
    off_h = rng.randint(0, max(h - crop_h, 0) + 1)
    off_w = rng.randint(0, max(w - crop_w, 0) + 1)
    out = crop(sample, (off_w, off_h, off_w + crop_w, off_h + crop_h))
    ch, cw = out["image"].shape[:2]
    b = out["boxes"]
    valid = (b[:, 0] < cw) & (b[:, 1] < ch) & (b[:, 2] > 0) & (b[:, 3] > 0)
    if not valid.any() and not self.allow_negative_crop:
      return None
    return select_boxes(out, valid)
