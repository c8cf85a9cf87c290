"""The result type shared by the anchor / point assigners."""
from typing import NamedTuple

import jax
import numpy as np

# gt_index conventions (mmdetection's assigned_gt_inds minus one).
BACKGROUND = -1
IGNORED = -2


class Assignment(NamedTuple):
  """Per-prior assignment of one image.

  gt_index:    (A,) int32. >= 0: index of the assigned ground-truth row; -1 background; -2 ignored
               (never a training target, e.g. priors outside the image's padded area).
  labels:      (A,) int32. Class of the assigned gt; -1 where gt_index < 0.
  max_overlap: (A,) float32. mmdetection's ``AssignResult.max_overlaps`` for the same priors.
  """
  gt_index: jax.Array
  labels: jax.Array
  max_overlap: jax.Array


def check_inputs(priors, gt_boxes, gt_labels, gt_mask, valid=None, *, name='anchors', width=4):
  """The shape checks every assigner makes; a ValueError names the argument."""
  if np.ndim(priors) != 2 or np.shape(priors)[-1] != width:
    raise ValueError(f'{name} must be ({name[0].upper()}, {width}), got shape {np.shape(priors)}')
  if np.ndim(gt_boxes) != 2 or np.shape(gt_boxes)[-1] != 4:
    raise ValueError(f'gt_boxes must be (G, 4), got shape {np.shape(gt_boxes)}')
  num_gts = np.shape(gt_boxes)[0]
  if np.shape(gt_labels) != (num_gts,):
    raise ValueError(f'gt_labels must be ({num_gts},), got shape {np.shape(gt_labels)}')
  if np.shape(gt_mask) != (num_gts,):
    raise ValueError(f'gt_mask must be ({num_gts},), got shape {np.shape(gt_mask)}')
  if valid is not None and np.shape(valid) != (np.shape(priors)[0],):
    raise ValueError(f'valid must be ({np.shape(priors)[0]},), got shape {np.shape(valid)}')
