"""Sine positional encoding of a 2-d feature map (DETR; mmdetection's `SinePositionalEncoding`).

For each unpadded position the row / column index counted from 1 over the *unpadded* pixels
(cumulative sum of ``~mask`` along the axis), optionally normalised by the image's last unpadded
index to ``(index + offset) / (last + eps) * scale`` (a value in (0, scale]), is divided by
``temperature ** (2 * (i // 2) / num_feats)`` for ``i = 0 .. num_feats - 1``; even ``i`` take
the sine, odd ``i`` the cosine (interleaved: sin, cos, sin, cos, ...). The y features come first:
channels ``[pos_y (num_feats), pos_x (num_feats)]``. Padded positions get whatever the cumulative
sum gives them (mmdetection does the same; attention never looks at them).
"""
import math

import jax.numpy as jnp


def sine_positional_encoding(mask, *, num_feats=128, temperature=10000., normalize=True,
                             scale=2 * math.pi, eps=1e-6, offset=0.):
  """Positional encoding of a padded feature map.

  Args:
    mask: (B, H, W) bool, True where the position is padding (DETR's convention).
    num_feats: features per axis; the output has 2 * num_feats channels (DETR: 128 -> 256).
    temperature, normalize, scale, eps, offset: as mmdetection's `SinePositionalEncoding`
      (DETR: 10000, True, 2 pi, 1e-6, 0).
  Returns:
    (B, H, W, 2 * num_feats) float32, NHWC, channels `cat(pos_y, pos_x)`.
  """
  if mask.ndim != 3:
    raise ValueError(f'mask must be (B, H, W), got shape {mask.shape}')
  not_mask = (~jnp.asarray(mask, bool)).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  if normalize:
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
  i = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = jnp.float32(temperature) ** (2 * jnp.floor(i / 2) / num_feats)
  return jnp.concatenate([_interleave(y_embed[..., None] / dim_t),
                          _interleave(x_embed[..., None] / dim_t)], axis=-1)


def _interleave(angles):
  """(..., F) -> (..., F): sin of the even features, cos of the odd ones, in their order."""
  pairs = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return pairs.reshape(angles.shape)
