"""Per-level head outputs <-> one flat prior axis (shared by losses and post-processing).

Dense heads return one NHWC map per pyramid level; priors (anchors, points) are ordered
(level, y, x, base prior) as mmdetection's prior generators order them. These helpers turn the
maps into that flat order and back, with static shapes.
"""
from typing import Sequence

import jax
import jax.numpy as jnp


def featmap_sizes_of(level_maps) -> tuple:
  """Static (h, w) of each level from per-level maps (B, H_l, W_l, C)."""
  return tuple((int(x.shape[1]), int(x.shape[2])) for x in level_maps)


def flatten_levels(level_outputs: Sequence[jax.Array], width: int) -> jax.Array:
  """Per-level maps (B, H_l, W_l, P_l * width) -> (B, sum_l H_l W_l P_l, width), in the priors'
  order (level, y, x, prior)."""
  return jnp.concatenate([x.reshape(x.shape[0], -1, width) for x in level_outputs], axis=1)
