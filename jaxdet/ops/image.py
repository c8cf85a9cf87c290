"""Image normalisation on the device (pure jnp)."""
import jax.numpy as jnp


def normalize_images(images, img_shape, *, mean, std, to_bgr=False, dtype=None):
  """Normalise a padded batch on the device; padded pixels become exactly 0.

  Args:
    images: (..., H, W, 3) uint8 (or float) RGB, padded at the bottom/right.
    img_shape: (..., 2) int (h, w) of each valid image region.
    mean, std: 3 values in the model's channel order (BGR when ``to_bgr``).
    to_bgr: reverse the channels first (caffe-style backbones).
    dtype: output dtype (default float32).
  Returns:
    (..., H, W, 3) ``(x - mean) / std`` inside each image, 0 in the padding (as mmdetection,
    which normalises first and then pads with 0).
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if to_bgr:
    x = x[..., ::-1]
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  hgt, wid = x.shape[-3], x.shape[-2]
  img_shape = jnp.asarray(img_shape)
  rows = jnp.arange(hgt)[:, None] < img_shape[..., 0, None, None]
  cols = jnp.arange(wid)[None, :] < img_shape[..., 1, None, None]
  x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x.astype(dtype or jnp.float32)
