"""Training and test transforms with mmdetection 3.3 semantics (numpy, on the host).

A *sample* is a plain dict that flows through the transforms::

  image:    (h, w, 3) uint8 RGB (float32 after a float PhotoMetricDistortion)
  boxes:    (n, 4) float32, xyxy in pixels of the current image
  labels:   (n,) int32 in 0..K-1
  crowd:    (n,) bool; crowd boxes ride along (MinIoURandomCrop looks at them, as mmdet's
            ignored boxes) and are dropped as targets at the end (`training_targets`)
  image_id: int;  orig_size: (h, w) of the decoded file
  affine:   (2, 2) float64 [[ax, bx], [ay, by]]: a point x of the original image sits at
            ``ax * x + bx`` of the current image (ax < 0 after a horizontal flip)

Each transform is a small class called as ``t(sample, rng) -> sample`` where ``rng`` is a
``np.random.RandomState``. They draw random numbers in exactly the order and from exactly the
distributions mmdetection / mmcv draw them from the global ``np.random`` state, so seeding both
with the same value gives the same decisions (the mmdet comparison tests rely on this).

Image resizing uses Pillow's bilinear filter by default (mmdet uses OpenCV's): sizes, scale
factors and boxes are identical; pixel values agree within 1 grey level when enlarging, while
Pillow antialiases when shrinking (SSD's 300 x 300). ``resize_backend='cv2'`` reproduces
mmdetection's pixels exactly where OpenCV is installed.

Normalisation is meant to run on the device (`normalize_images`): batches stay uint8 (4x less
host->device traffic) and the padded pixels are 0 after normalisation, as in mmdetection,
which pads after normalising.
"""
import math

import numpy as np
from PIL import Image

from jaxdet.ops.boxes import boxes_to_original  # noqa: F401  (re-exported)
from jaxdet.ops.image import normalize_images  # noqa: F401  (re-exported)

PYTORCH_NORM = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), to_bgr=False)
CAFFE_NORM = dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_bgr=True)

_FLT_EPSILON = np.float32(1.1920929e-07)  # OpenCV's FLT_EPSILON in its HSV formulas


# ----------------------------------------------------------------------------- samples

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


def _scale_affine(affine, w_scale, h_scale):
  return affine * np.array([[w_scale], [h_scale]])


def _shift_affine(affine, dx, dy):
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


# ----------------------------------------------------------------------------- geometry

def rescale_size(old_size, scale):
  """mmcv ``rescale_size``: ``old_size`` (w, h); ``scale`` a number or a (long, short) tuple.

  A tuple scales as large as possible with the long side <= max(scale) and the short side
  <= min(scale). Returns ((new_w, new_h), factor) with ``new = int(old * factor + 0.5)``.
  """
  w, h = old_size
  if isinstance(scale, (int, float)):
    if scale <= 0:
      raise ValueError(f"scale must be positive, got {scale}")
    factor = float(scale)
  else:
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return (int(w * factor + 0.5), int(h * factor + 0.5)), factor


def resize_image(image, size, backend="pillow"):
  """Bilinear resize of ``image (h, w, C)`` (uint8 or float32) to ``size = (new_w, new_h)``.

  ``backend='pillow'`` (default, a jaxdet dependency) antialiases when shrinking;
  ``'cv2'`` (OpenCV, if installed) is mmdetection's resize, pixel for pixel.
  """
  new_w, new_h = int(size[0]), int(size[1])
  if image.shape[1] == new_w and image.shape[0] == new_h:
    return image
  if backend == "cv2":
    try:
      import cv2  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ValueError("data.pipeline.resize_backend='cv2' needs OpenCV (pip install "
                       "opencv-python-headless)") from e
    return cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  if backend != "pillow":
    raise ValueError(f"resize backend must be 'pillow' or 'cv2', got {backend!r}")
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (new_w, new_h), Image.Resampling.BILINEAR))
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F")
                      .resize((new_w, new_h), Image.Resampling.BILINEAR))
           for c in range(image.shape[2])]
  return np.stack(chans, axis=-1)


def _resize_to(sample, new_w, new_h, backend="pillow"):
  """Resize image and boxes to (new_w, new_h); scale factor = new / old per axis (mmcv);
  boxes are clipped to the new image (mmdet's clip_object_border)."""
  h, w = sample["image"].shape[:2]
  w_scale, h_scale = new_w / w, new_h / h
  out = dict(sample)
  out["image"] = resize_image(sample["image"], (new_w, new_h), backend)
  boxes = sample["boxes"] * np.array([w_scale, h_scale, w_scale, h_scale], np.float32)
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, new_w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, new_h)
  out["boxes"] = boxes
  out["affine"] = _scale_affine(sample["affine"], w_scale, h_scale)
  return out


class Resize:
  """mmdet ``Resize(scale=(w, h), keep_ratio)``; boxes scaled and clipped to the new image.

  ``keep_ratio=True``: the largest size with long side <= max(scale), short <= min(scale)
  (mmcv ``imrescale``). ``keep_ratio=False``: exactly ``scale`` = (w, h) (SSD's 300 x 300).
  ``backend``: see `resize_image`.
  """

  def __init__(self, scale, keep_ratio=True, backend="pillow"):
    if len(scale) != 2 or min(scale) <= 0:
      raise ValueError(f"scale must be a (w, h) pair of positive sizes, got {scale}")
    if backend not in ("pillow", "cv2"):
      raise ValueError(f"resize backend must be 'pillow' or 'cv2', got {backend!r}")
    self.scale, self.keep_ratio, self.backend = tuple(scale), keep_ratio, backend

  def output_size(self, h, w):
    """(new_h, new_w) this transform gives an (h, w) image."""
    if self.keep_ratio:
      (nw, nh), _ = rescale_size((w, h), self.scale)
      return nh, nw
    return self.scale[1], self.scale[0]

  def __call__(self, sample, rng=None):
    nh, nw = self.output_size(*sample["image"].shape[:2])
    return _resize_to(sample, nw, nh, self.backend)


class RandomChoiceResize:
  """mmcv ``RandomChoiceResize``: one of ``scales`` uniformly ('value' mode), then `Resize`."""

  def __init__(self, scales, keep_ratio=True, backend="pillow"):
    if not scales:
      raise ValueError("RandomChoiceResize needs at least one scale")
    self.resizes = [Resize(s, keep_ratio, backend) for s in scales]

  def __call__(self, sample, rng):
    return self.resizes[rng.randint(len(self.resizes))](sample)


class RandomFlip:
  """Horizontal flip with probability ``prob``: x1' = w - x2, x2' = w - x1 (mmdet)."""

  def __init__(self, prob=0.5):
    if not 0 <= prob <= 1:
      raise ValueError(f"flip prob must be in [0, 1], got {prob}")
    self.prob = float(prob)

  def __call__(self, sample, rng):
    # mmcv draws np.random.choice(['horizontal', None], p=[prob, 1 - prob]).
    if rng.choice(2, p=[self.prob, 1.0 - self.prob]) != 0:
      return sample
    return flip_horizontal(sample)


def flip_horizontal(sample):
  """Mirror image and boxes left-right (deterministic)."""
  w = sample["image"].shape[1]
  out = dict(sample)
  out["image"] = sample["image"][:, ::-1]
  b = sample["boxes"]
  out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
  (ax, bx), (ay, by) = sample["affine"]
  out["affine"] = np.array([[-ax, w - bx], [ay, by]])
  return out


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
    out["affine"] = _shift_affine(sample["affine"], left, top)
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


def crop(sample, patch):
  """Cut ``patch = (x1, y1, x2, y2)`` (ints) out of the image; boxes shift by (-x1, -y1) and
  are clipped to the crop. Boxes are *not* filtered here."""
  x1, y1, x2, y2 = (int(v) for v in patch)
  out = dict(sample)
  out["image"] = sample["image"][y1:y2, x1:x2]
  ch, cw = out["image"].shape[:2]
  b = sample["boxes"] - np.array([x1, y1, x1, y1], np.float32)
  b[:, 0::2] = np.clip(b[:, 0::2], 0, cw)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, ch)
  out["boxes"] = b
  out["affine"] = _shift_affine(sample["affine"], -x1, -y1)
  return out


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


# ----------------------------------------------------------------------------- photometric

def rgb_to_hsv(img):
  """float32 RGB (..., 3) -> HSV with H in [0, 360), S = (V - min) / |V|, V = max: OpenCV's
  float ``cvtColor`` formulas (also for values outside [0, 255], as mmdet feeds it)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  v = np.maximum(np.maximum(r, g), b)
  vmin = np.minimum(np.minimum(r, g), b)
  diff = v - vmin
  s = diff / (np.abs(v) + _FLT_EPSILON)
  d = np.float32(60.0) / (diff + _FLT_EPSILON)
  hue = np.where(v == r, (g - b) * d, np.where(v == g, (b - r) * d + 120, (r - g) * d + 240))
  hue = np.where(hue < 0, hue + 360, hue)
  return np.stack([hue, s, v], axis=-1).astype(np.float32)


# OpenCV's HSV2RGB sector table, as (b, g, r) indices into (v, v(1-s), v(1-sf), v(1-s(1-f))).
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_to_rgb(img):
  """Inverse of `rgb_to_hsv` (OpenCV's float HSV2RGB with H in degrees)."""
  hue, s, v = img[..., 0], img[..., 1], img[..., 2]
  h6 = np.mod(hue * np.float32(6.0 / 360.0), np.float32(6.0))
  sector = np.floor(h6).astype(np.int64)
  frac = h6 - sector
  bad = (sector < 0) | (sector >= 6)
  sector = np.where(bad, 0, sector)
  frac = np.where(bad, np.float32(0), frac)
  tab = np.stack([v, v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))], axis=-1)
  idx = _SECTOR_BGR[sector]  # (..., 3) in b, g, r order
  bgr = np.take_along_axis(tab, idx, axis=-1)
  rgb = bgr[..., ::-1]
  return np.where((s == 0)[..., None], v[..., None], rgb).astype(np.float32)


class PhotoMetricDistortion:
  """SSD colour jitter (mmdet ``PhotoMetricDistortion``), each step with probability 1/2:
  brightness +-delta, contrast x[lo, hi] (before or after the HSV steps, 1/2 each),
  saturation x[lo, hi] (clipped to [0, 1] when > 1), hue +-delta degrees, channel shuffle.

  ``out_uint8=True`` rounds and clips the result to uint8 (what the original Caffe SSD's
  saturating arithmetic gives, and what keeps batches uint8); ``False`` returns mmdet's
  unclipped float32 image.
  """

  def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5),
               saturation_range=(0.5, 1.5), hue_delta=18, out_uint8=True):
    self.brightness_delta = brightness_delta
    self.contrast_lower, self.contrast_upper = contrast_range
    self.saturation_lower, self.saturation_upper = saturation_range
    self.hue_delta = hue_delta
    self.out_uint8 = out_uint8

  def __call__(self, sample, rng):
    mode, bright_f, contrast_f, sat_f, hue_f, swap_f = (rng.randint(2) for _ in range(6))
    delta = rng.uniform(-self.brightness_delta, self.brightness_delta)
    alpha = rng.uniform(self.contrast_lower, self.contrast_upper)
    sat = rng.uniform(self.saturation_lower, self.saturation_upper)
    hue = rng.uniform(-self.hue_delta, self.hue_delta)
    perm_bgr = rng.permutation(3)

    img = sample["image"].astype(np.float32)
    if bright_f:
      img += np.float32(delta)
    if mode == 1 and contrast_f:
      img *= np.float32(alpha)
    img = rgb_to_hsv(img)
    if sat_f:
      img[..., 1] *= np.float32(sat)
      if sat > 1:
        img[..., 1] = img[..., 1].clip(0, 1)
    if hue_f:
      hch = img[..., 0]
      hch += np.float32(hue)
      hch[hch > 360] -= 360
      hch[hch < 0] += 360
    img = hsv_to_rgb(img)
    if mode == 0 and contrast_f:
      img *= np.float32(alpha)
    if swap_f:
      # mmdet permutes BGR channels with perm_bgr; the same permutation in RGB order:
      img = img[..., 2 - perm_bgr[::-1]]
    if self.out_uint8:
      img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out = dict(sample)
    out["image"] = img
    return out


# ----------------------------------------------------------------------------- composition

class Compose:
  """Apply transforms in order; a transform returning None ends the chain with None."""

  def __init__(self, transforms):
    self.transforms = list(transforms)

  def __call__(self, sample, rng):
    for t in self.transforms:
      sample = t(sample, rng)
      if sample is None:
        return None
    return sample


class RandomChoice:
  """mmcv ``RandomChoice``: apply one of several transform chains, chosen uniformly."""

  def __init__(self, branches):
    self.branches = [Compose(b) for b in branches]

  def __call__(self, sample, rng):
    return self.branches[rng.choice(len(self.branches))](sample, rng)


def fit_into(sample, shape, backend="pillow"):
  """Shrink (keep ratio) an image that does not fit ``shape = (H, W)``; else unchanged.

  A safety net for buckets: standard pipelines always fit theirs; DETR's crop branch can turn
  a landscape image portrait, which then gets scaled down to fit its bucket.
  """
  h, w = sample["image"].shape[:2]
  if h <= shape[0] and w <= shape[1]:
    return sample
  (nw, nh), _ = rescale_size((w, h), min(shape[0] / h, shape[1] / w))
  return _resize_to(sample, min(nw, shape[1]), min(nh, shape[0]), backend)


def pad_to_multiple(image, divisor):
  """Zero-pad ``image (h, w, C)`` at the bottom/right to multiples of ``divisor`` (mmdet Pad)."""
  h, w = image.shape[:2]
  ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
  return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))


# ----------------------------------------------------------------------------- device side

# ----------------------------------------------------------------------------- from config

def _ceil_to(x, d):
  return int(math.ceil(x / d) * d)


def _detr_scales(short_sides, max_size):
  return [(int(s), int(max_size)) for s in short_sides]


def build_train_transform(pipeline, img_scale):
  """The training transform chain for ``data.pipeline`` (a ConfigDict / dict).

  kinds:
    'standard': Resize keep-ratio to ``img_scale`` (or RandomChoiceResize over
      ``pipeline.multiscale``), RandomFlip(flip_ratio). mmdetection's default detectors.
    'ssd': Expand(mean, expand_ratio), MinIoURandomCrop(min_ious, min_crop_size), Resize to
      ``img_scale`` without keeping ratio, RandomFlip, PhotoMetricDistortion.
    'detr': RandomFlip, then either RandomChoiceResize(short sides ``detr_short_sides``, max
      ``detr_max_size``) or [RandomChoiceResize(``detr_crop_short_sides``), RandomCrop
      (``detr_crop_size``), the same multi-scale resize].
  """
  kind = pipeline.get("kind", "standard")
  flip = RandomFlip(pipeline.get("flip_ratio", 0.5))
  keep_ratio = pipeline.get("keep_ratio", True)
  be = pipeline.get("resize_backend", "pillow")
  if kind == "standard":
    scales = [tuple(s) for s in (pipeline.get("multiscale") or ())]
    resize = (RandomChoiceResize(scales, keep_ratio, be) if scales
              else Resize(img_scale, keep_ratio, be))
    return Compose([resize, flip])
  if kind == "ssd":
    return Compose([
        Expand(pipeline.get("mean", PYTORCH_NORM["mean"]),
               pipeline.get("expand_ratio", (1, 4))),
        MinIoURandomCrop(pipeline.get("min_ious", (0.1, 0.3, 0.5, 0.7, 0.9)),
                         pipeline.get("min_crop_size", 0.3)),
        Resize(img_scale, keep_ratio=False, backend=be),
        flip,
        PhotoMetricDistortion(out_uint8=pipeline.get("photometric_uint8", True)),
    ])
  if kind == "detr":
    max_size = pipeline.get("detr_max_size", 1333)
    multi = RandomChoiceResize(_detr_scales(
        pipeline.get("detr_short_sides", range(480, 801, 32)), max_size), backend=be)
    crop_resize = RandomChoiceResize(_detr_scales(
        pipeline.get("detr_crop_short_sides", (400, 500, 600)), max_size), backend=be)
    return Compose([flip, RandomChoice([
        [multi],
        [crop_resize, RandomCrop(pipeline.get("detr_crop_size", (384, 600))), multi]])])
  raise ValueError(f"data.pipeline.kind must be 'standard', 'ssd' or 'detr', got {kind!r}")


def build_test_transform(pipeline, img_scale):
  """Test-time chain: one Resize to ``img_scale`` (keep-ratio unless ``kind == 'ssd'``)."""
  kind = pipeline.get("kind", "standard")
  if kind not in ("standard", "ssd", "detr"):
    raise ValueError(f"data.pipeline.kind must be 'standard', 'ssd' or 'detr', got {kind!r}")
  keep_ratio = kind != "ssd" and pipeline.get("keep_ratio", True)
  return Compose([Resize(img_scale, keep_ratio, pipeline.get("resize_backend", "pillow"))])


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
    return [(_ceil_to(img_scale[1], d), _ceil_to(img_scale[0], d))]
  scales = [tuple(img_scale)]
  if train and kind == "standard" and pipeline.get("multiscale"):
    scales = [tuple(s) for s in pipeline.get("multiscale")]
  if train and kind == "detr":
    scales = _detr_scales(pipeline.get("detr_short_sides", range(480, 801, 32)),
                          pipeline.get("detr_max_size", 1333))
  long_side = max(max(s) for s in scales)
  short_side = max(min(s) for s in scales)
  land = (_ceil_to(short_side, d), _ceil_to(long_side, d))
  return [land] if land[0] == land[1] else [land, land[::-1]]


def choose_bucket(h, w, buckets):
  """Index of the bucket whose aspect ratio is closest to an (h, w) image (ties: first)."""
  if len(buckets) == 1:
    return 0
  r = math.log(w / h)
  return int(np.argmin([abs(math.log(bw / bh) - r) for bh, bw in buckets]))
