"""What every source yields, and the helpers the sources share.

A record is a dict::

  image:     uint8 (H, W, 3) RGB (gray, palette, RGBA, CMYK and 16-bit files are converted)
  boxes:     float32 (n, 4) xyxy in original pixels, clipped to the image; boxes with zero
             area after clipping, or narrower / lower than 1 px before (as mmdetection's
             CocoDataset), are dropped
  labels:    int32 (n,) in 0..K-1
  crowd:     bool (n,); crowd boxes stay in the record (the transforms drop them as
             targets; pycocotools uses them to ignore detections in evaluation)
  image_id:  int, the original image id
  orig_size: (h, w) ints, the decoded image's size

``source.annotations(i)`` gives the same record without ``image`` and without decoding it, and
``source.index_info()`` gives ``dict(heights, widths, num_targets)`` as (N,) arrays (original
sizes; non-crowd boxes >= 1 px wide and high) so that the loader can bucket images and drop
those without targets before reading any pixels (TFDS: one pass over the split, no decoding).

With ``skip_bad_images=True`` a record whose image cannot be decoded is logged and returned
as ``None``; consumers filter it out. Every problem with the input is a ``DataError`` (a
``ValueError``) with a one-line message naming the file, key or value.
"""
import operator

import numpy as np


class DataError(ValueError):
  """Bad input data; the message is one line naming the file, key or value."""


def check_index(i, length):
  """``i`` as an index into ``length`` records (negative counts from the end); ``IndexError``
  outside ``[-length, length)``."""
  i = operator.index(i)
  if not -length <= i < length:
    raise IndexError(f'index {i} out of range for {length} images')
  return i % length


def index_info_arrays(sizes, boxes, crowd, offsets):
  """dict(heights, widths, num_targets) of (N,) arrays; a target is a non-crowd box >= 1 px
  wide and high. ``boxes (A, 4)`` of all images, image ``i``'s at ``offsets[i]:offsets[i+1]``."""
  wh = boxes[:, 2:] - boxes[:, :2]
  target = ~crowd & (wh[:, 0] >= 1) & (wh[:, 1] >= 1)
  owner = np.repeat(np.arange(len(sizes)), np.diff(offsets))
  num_targets = np.bincount(owner[target], minlength=len(sizes)).astype(np.int64)
  return dict(heights=sizes[:, 0].astype(np.int64), widths=sizes[:, 1].astype(np.int64),
              num_targets=num_targets)


def clip_and_filter(boxes, keep, height, width):
  """Clips xyxy ``boxes (n, 4)`` to the image and clears ``keep`` where the area is 0."""
  boxes = boxes.copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return boxes, keep & (area > 0)
