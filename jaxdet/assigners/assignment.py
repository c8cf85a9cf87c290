"""The result type shared by the anchor / point assigners."""
from typing import NamedTuple

import jax

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
