"""Geometric transforms (mmdetection / mmcv semantics): resize, random choice of scale,
horizontal flip, crop."""
import numpy as np
from PIL import Image

from jaxdet.data.transforms.sample import scale_affine, shift_affine


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


def resize_to(sample, new_w, new_h, backend="pillow"):
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
  out["affine"] = scale_affine(sample["affine"], w_scale, h_scale)
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
    return resize_to(sample, nw, nh, self.backend)


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
  out["affine"] = shift_affine(sample["affine"], -x1, -y1)
  return out
