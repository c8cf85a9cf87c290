"""mmdetection's `ChannelMapper` without norm and activation (DETR's input projection), NHWC.

Each input map gets its own k x k conv (padding k // 2, with bias) to `out_channels`. DETR:
one 1x1 conv 2048 -> 256 on C5, 524,544 parameters. Initialisation as mmdetection's (measured on
mmdetection 3.3: its Xavier init_cfg is what the weights end with): xavier-uniform kernel, zero
bias. mmdetection's extra outputs (`num_outs` > inputs) are not built.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.registry import NECKS, Part


class ChannelMapper(nn.Module):
  """feats: tuple of (B, H_i, W_i, C_i) -> tuple of (B, H_i, W_i, out_channels)."""
  out_channels: int = 256
  kernel_size: int = 1
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False):
    del train  # no norm / dropout
    k, pad = self.kernel_size, self.kernel_size // 2
    return tuple(
        Conv(self.out_channels, (k, k), padding=((pad, pad), (pad, pad)), use_bias=True,
             kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
             dtype=self.dtype, name=f'convs_{i}')(x)
        for i, x in enumerate(feats))


def from_config(cfg, dtype=None):
  """The ChannelMapper of `config.model.neck` (type 'channel_mapper': out_channels, kernel_size)."""
  return ChannelMapper(out_channels=cfg.out_channels, kernel_size=cfg.get('kernel_size', 1),
                       dtype=dtype)


# mmdetection's names: mmcv ConvModule's `.conv` inside `convs`.
TORCH_NAMES = ((r'convs\.(\d+)\.conv', r'convs_\1'),)

NECKS.register('channel_mapper', Part(build=from_config, torch_names=TORCH_NAMES))
