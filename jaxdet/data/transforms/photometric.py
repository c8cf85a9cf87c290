"""Colour transforms: OpenCV's float RGB <-> HSV and SSD's ``PhotoMetricDistortion``."""
import numpy as np

_FLT_EPSILON = np.float32(1.1920929e-07)  # OpenCV's FLT_EPSILON in its HSV formulas


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
