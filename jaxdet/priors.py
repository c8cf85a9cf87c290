"""Prior grids: anchors, SSD priors and points, bit for bit those of mmdetection 3.3.

All priors of a detector are one concatenated array, ordered level, then y (row), then x
(column), then base prior -- mmdetection's order after ``torch.cat`` of its per-level lists.
``level_counts(featmap_sizes, num_base_priors)`` gives the per-level lengths (what
mmdetection's assigners call ``num_level_anchors``).

The grids depend only on static shapes, so they are computed with numpy float32 at trace
time, using the same float32 operations in the same order as mmdetection's torch code (numpy
and torch both round every float32 op correctly, so the results are identical), and returned
as float32 ``jnp`` arrays; under ``jit`` they become constants.  Only ``valid_flags`` takes a
possibly traced input (each image's own padded shape) so it can be vmapped over a batch.

Arguments common to all generators:
  featmap_sizes: sequence of ``(height, width)`` per level, positive ints.
  strides: one per level, an int or a ``(stride_w, stride_h)`` pair (mmdetection's order).
"""
import jax.numpy as jnp
import numpy as np

F32 = np.float32


def _pairs(strides, name="strides"):
  out = []
  for s in strides:
    pair = (s, s) if np.isscalar(s) else tuple(s)
    if len(pair) != 2 or not all(np.isscalar(v) and v > 0 for v in pair):
      raise ValueError(f"{name} must hold positive numbers or (w, h) pairs, got {strides!r}")
    out.append(pair)
  return out


def _check_featmap_sizes(featmap_sizes, num_levels):
  sizes = [tuple(s) for s in featmap_sizes]
  if len(sizes) != num_levels:
    raise ValueError(f"featmap_sizes has {len(sizes)} levels but strides has {num_levels}")
  for s in sizes:
    if len(s) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in s):
      raise ValueError(f"featmap_sizes must be (height, width) pairs of positive ints, got {s!r}")
  return [(int(h), int(w)) for h, w in sizes]


def level_counts(featmap_sizes, num_base_priors=1):
  """Number of priors per level: ``h * w * num_base_priors`` (an int or one per level).

  Base priors per location: ``len(ratios) * num_scales`` for ``anchor_grid`` (RetinaNet 9,
  ATSS 1), ``ssd_num_base_anchors(ratios)`` for SSD, 1 for ``point_grid``.
  """
  sizes = [tuple(s) for s in featmap_sizes]
  nb = [num_base_priors] * len(sizes) if np.isscalar(num_base_priors) else list(num_base_priors)
  if len(nb) != len(sizes):
    raise ValueError(f"num_base_priors has {len(nb)} entries for {len(sizes)} levels")
  return tuple(int(h * w * n) for (h, w), n in zip(sizes, nb))


def _base_anchors(base_size, ratios, scales, scale_major, center):
  """mmdetection's ``gen_single_level_base_anchors`` in numpy float32.

  ``ratios`` (R,) and ``scales`` (S,) float32 (ratio = height / width).  Returns (R*S, 4):
  ratio-major (``scale_major=True``: row r*S + s) or scale-major (row s*R + r).
  """
  base_size = F32(base_size)  # torch casts a Python scalar operand to the tensor's float32
  h_ratios = np.sqrt(ratios)
  w_ratios = F32(1) / h_ratios
  if scale_major:
    ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
  else:
    ws = (base_size * scales[:, None] * w_ratios[None, :]).reshape(-1)
    hs = (base_size * scales[:, None] * h_ratios[None, :]).reshape(-1)
  cx, cy = F32(center[0]), F32(center[1])
  return np.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], axis=-1)


def _place(base, featmap_size, stride):
  """Shift ``base (K, 4)`` to every cell of one level -> ``(h * w * K, 4)``, y-major."""
  feat_h, feat_w = featmap_size
  stride_w, stride_h = stride
  shift_x = np.arange(feat_w).astype(F32) * F32(stride_w)
  shift_y = np.arange(feat_h).astype(F32) * F32(stride_h)
  xx = np.tile(shift_x, feat_h)
  yy = np.repeat(shift_y, feat_w)
  shifts = np.stack([xx, yy, xx, yy], axis=-1)
  return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def _concat(levels, width):
  if not levels:
    return jnp.zeros((0, width), jnp.float32)
  return jnp.asarray(np.concatenate(levels, axis=0).astype(F32))


def anchor_grid(featmap_sizes, *, strides, ratios, octave_base_scale=None,
                scales_per_octave=None, scales=None, base_sizes=None, scale_major=True,
                center_offset=0.):
  """mmdetection's ``AnchorGenerator(...).grid_priors(featmap_sizes)``, concatenated.

  Args:
    ratios: anchor height / width ratios, e.g. (0.5, 1., 2.).
    octave_base_scale, scales_per_octave: scales = octave_base_scale * 2**(i / scales_per_octave)
      (RetinaNet 4 and 3, ATSS 8 and 1).  Give these or ``scales``, not both.
    scales: explicit anchor scales (multiples of the base size).
    base_sizes: per-level base size in pixels; default the smaller stride of each level.
    scale_major: base anchor order ratio-major (mmdetection's default, True) or scale-major.
    center_offset: anchor centre within a cell as a fraction of the base size (0 in v2+).
  Returns:
    (A, 4) float32 xyxy input pixels, A = sum_l h_l * w_l * len(ratios) * num_scales.
  """
  pairs = _pairs(strides)
  sizes = _check_featmap_sizes(featmap_sizes, len(pairs))
  if (octave_base_scale is not None and scales_per_octave is not None) == (scales is not None):
    raise ValueError("give either scales or octave_base_scale with scales_per_octave, got "
                     f"scales={scales!r}, octave_base_scale={octave_base_scale!r}, "
                     f"scales_per_octave={scales_per_octave!r}")
  if scales is None:
    octave = np.array([2**(i / scales_per_octave) for i in range(scales_per_octave)])
    scales = octave * octave_base_scale  # float64 as mmdetection, then float32
  scales = np.asarray(scales, np.float64).astype(F32).reshape(-1)
  ratios = np.asarray(ratios, np.float64).astype(F32).reshape(-1)
  if ratios.size == 0 or scales.size == 0 or np.any(ratios <= 0) or np.any(scales <= 0):
    raise ValueError(f"ratios and scales must be non-empty and positive, got {ratios}, {scales}")
  if not 0 <= center_offset <= 1:
    raise ValueError(f"center_offset must lie in [0, 1], got {center_offset}")
  if base_sizes is None:
    base_sizes = [min(p) for p in pairs]
  if len(base_sizes) != len(pairs):
    raise ValueError(f"base_sizes has {len(base_sizes)} entries for {len(pairs)} strides")
  levels = []
  for size, stride, base_size in zip(sizes, pairs, base_sizes):
    center = (center_offset * base_size, center_offset * base_size)
    base = _base_anchors(base_size, ratios, scales, scale_major, center)
    levels.append(_place(base, size, stride))
  return _concat(levels, 4)


def ssd_min_max_sizes(*, input_size, basesize_ratio_range, num_levels):
  """Per-level (min_size, max_size) in pixels, as mmdetection's ``SSDAnchorGenerator``.

  The ratio range is turned into integer percentages, stepped by
  ``int(floor(max - min) / (num_levels - 2))``, sizes truncated with ``int``; a smaller first
  level is prepended (input 300: 7%-15% for range start 0.15, 10%-20% for 0.2; input 512:
  4%-10% for 0.1, 7%-15% for 0.15).  SSD300 COCO: (21, 45), (45, 99), (99, 153), (153, 207),
  (207, 261), (261, 315).
  """
  min_ratio, max_ratio = basesize_ratio_range
  if not all(isinstance(v, float) for v in (min_ratio, max_ratio)):
    raise ValueError(f"basesize_ratio_range must be two floats, got {basesize_ratio_range!r}")
  if num_levels < 3:
    raise ValueError(f"SSD needs at least 3 levels, got {num_levels}")
  first = {(300, 0.15): (7, 15), (300, 0.2): (10, 20),
           (512, 0.1): (4, 10), (512, 0.15): (7, 15)}.get((input_size, min_ratio))
  if first is None:
    raise ValueError("basesize_ratio_range[0] must be 0.15 or 0.2 for input_size 300, 0.1 or "
                     f"0.15 for 512; got input_size={input_size!r}, range={basesize_ratio_range!r}")
  min_ratio = int(min_ratio * 100)
  max_ratio = int(max_ratio * 100)
  step = int(np.floor(max_ratio - min_ratio) / (num_levels - 2))
  if step <= 0:
    raise ValueError(f"basesize_ratio_range {basesize_ratio_range!r} is too narrow")
  min_sizes = [int(input_size * first[0] / 100)]
  max_sizes = [int(input_size * first[1] / 100)]
  for ratio in range(min_ratio, max_ratio + 1, step):
    min_sizes.append(int(input_size * ratio / 100))
    max_sizes.append(int(input_size * (ratio + step) / 100))
  if len(min_sizes) != num_levels:
    raise ValueError(f"basesize_ratio_range {basesize_ratio_range!r} gives {len(min_sizes)} "
                     f"levels, strides give {num_levels}")
  return tuple(zip(min_sizes, max_sizes))


def ssd_num_base_anchors(ratios):
  """SSD priors per location for each level: ``2 + 2 * len(ratios[l])`` (4 or 6)."""
  return tuple(2 + 2 * len(r) for r in ratios)


def ssd_anchor_grid(featmap_sizes, *, strides, ratios, input_size=300,
                    basesize_ratio_range=(0.15, 0.9), min_sizes=None, max_sizes=None,
                    scale_major=False):
  """mmdetection's ``SSDAnchorGenerator(...).grid_priors(featmap_sizes)``, concatenated.

  Per level: sizes from ``ssd_min_max_sizes`` (or explicit ``min_sizes`` / ``max_sizes``),
  scales (1, sqrt(max / min)), ratios (1, 1/r, r for r in ratios[l]), centres at
  (stride / 2, stride / 2) of each cell.  Of the ratio x scale base anchors mmdetection keeps,
  in this order: (scale 0, ratio 1), (scale 1, ratio 1) -- with ``scale_major=False`` as all
  its SSD configs set -- then scale 0 with each other ratio.

  SSD300: strides (8, 16, 32, 64, 100, 300), ratios ([2], [2, 3], [2, 3], [2, 3], [2], [2]),
  featmaps 38, 19, 10, 5, 3, 1 -> 8732 priors.  SSD512: range (0.1, 0.9), strides
  (8, ..., 512), ratios ([2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]) -> 24564 priors.
  Returns (A, 4) float32 xyxy input pixels.
  """
  pairs = _pairs(strides)
  sizes = _check_featmap_sizes(featmap_sizes, len(pairs))
  if len(ratios) != len(pairs):
    raise ValueError(f"ratios has {len(ratios)} levels but strides has {len(pairs)}")
  if (min_sizes is None) != (max_sizes is None):
    raise ValueError("give both min_sizes and max_sizes or neither")
  if min_sizes is None:
    min_sizes, max_sizes = zip(*ssd_min_max_sizes(
        input_size=input_size, basesize_ratio_range=basesize_ratio_range,
        num_levels=len(pairs)))
  if not len(min_sizes) == len(max_sizes) == len(pairs):
    raise ValueError(f"min_sizes / max_sizes need {len(pairs)} entries")
  levels = []
  for k, (size, stride) in enumerate(zip(sizes, pairs)):
    scales = np.array([1., np.sqrt(max_sizes[k] / min_sizes[k])]).astype(F32)
    level_ratios = [1.]
    for r in ratios[k]:
      level_ratios += [1 / r, r]
    level_ratios = np.array(level_ratios).astype(F32)
    center = (stride[0] / 2., stride[1] / 2.)
    base = _base_anchors(min_sizes[k], level_ratios, scales, scale_major, center)
    num_ratios = len(level_ratios)
    keep = [0, num_ratios] + list(range(1, num_ratios))
    levels.append(_place(base[keep], size, stride))
  return _concat(levels, 4)


def point_grid(featmap_sizes, *, strides, offset=0.5, with_stride=False):
  """mmdetection's ``MlvlPointGenerator(strides, offset).grid_priors(...)``, concatenated.

  Point of cell (y, x): ``((x + offset) * stride_w, (y + offset) * stride_h)``.
  Returns (P, 2) float32 (x, y) input pixels, or (P, 4) with (stride_w, stride_h) appended.
  """
  pairs = _pairs(strides)
  sizes = _check_featmap_sizes(featmap_sizes, len(pairs))
  levels = []
  for (feat_h, feat_w), (stride_w, stride_h) in zip(sizes, pairs):
    shift_x = (np.arange(feat_w).astype(F32) + F32(offset)) * F32(stride_w)
    shift_y = (np.arange(feat_h).astype(F32) + F32(offset)) * F32(stride_h)
    cols = [np.tile(shift_x, feat_h), np.repeat(shift_y, feat_w)]
    if with_stride:
      cols += [np.full(feat_h * feat_w, stride_w, F32), np.full(feat_h * feat_w, stride_h, F32)]
    levels.append(np.stack(cols, axis=-1))
  return _concat(levels, 4 if with_stride else 2)


def valid_flags(featmap_sizes, pad_shape, *, strides, num_base_priors=1):
  """mmdetection's ``valid_flags``: which priors lie on the image's own padded area.

  A prior of cell (y, x) on a level is valid iff ``y < min(ceil(pad_h / stride_h), feat_h)``
  and likewise for x; computed as ``y * stride_h < pad_h`` (the same test for integer y).

  Args:
    pad_shape: ``(pad_h, pad_w)`` of this image, ints or floats (may be traced, e.g. a row of
      a batch's ``img_shape`` under vmap; a ``(..., 2)`` array gives ``(..., A)`` flags).  The
      batch's padded size is what ``featmap_sizes`` came from.
    num_base_priors: priors per location, an int or one per level (as ``level_counts``).
  Returns:
    (A,) bool jnp array, in the priors' order.
  """
  pairs = _pairs(strides)
  sizes = _check_featmap_sizes(featmap_sizes, len(pairs))
  counts = level_counts(sizes, num_base_priors)  # also validates num_base_priors
  cell_x, cell_y = [], []
  for (feat_h, feat_w), (stride_w, stride_h), n in zip(sizes, pairs, counts):
    per_cell = n // (feat_h * feat_w)
    cell_x.append(np.repeat(np.tile(np.arange(feat_w) * stride_w, feat_h), per_cell))
    cell_y.append(np.repeat(np.repeat(np.arange(feat_h) * stride_h, feat_w), per_cell))
  cell_x = jnp.asarray(np.concatenate(cell_x).astype(F32))
  cell_y = jnp.asarray(np.concatenate(cell_y).astype(F32))
  pad_shape = jnp.asarray(pad_shape)
  if pad_shape.shape[-1:] != (2,):
    raise ValueError(f"pad_shape must be (height, width), got shape {pad_shape.shape}")
  pad_h = pad_shape[..., 0, None].astype(jnp.float32)
  pad_w = pad_shape[..., 1, None].astype(jnp.float32)
  return (cell_y < pad_h) & (cell_x < pad_w)


__all__ = ["anchor_grid", "ssd_anchor_grid", "ssd_min_max_sizes", "ssd_num_base_anchors",
           "point_grid", "valid_flags", "level_counts"]
