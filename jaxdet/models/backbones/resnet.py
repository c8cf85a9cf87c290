"""ResNet backbones (He et al. 2016) as mmdetection builds them, NHWC.

`ResNet(depth=50, style='pytorch')` has exactly the parameters of mmdetection's `ResNet` without the
classifier (23,508,032 for R50, 42,500,160 for R101; BN running statistics are not parameters).

- style 'pytorch': the stride-2 of a bottleneck sits in its 3x3 conv (torchvision weights);
  style 'caffe': in its first 1x1 conv (MSRA / detectron weights).
- frozen_stages: -1 trains everything; 0 freezes the stem; i >= 1 freezes the stem and stages 1..i.
  Freezing stops gradients here (`stop_gradient` on the last frozen output); the optimizer must also
  skip weight decay for them (`frozen_param_mask`).
- norm_eval: BN always normalises with its stored statistics and never updates them (mmdetection's
  default for detection); otherwise BN uses batch statistics when `train=True`.
- norm_trainable: False is mmdetection's `norm_cfg=dict(type='BN', requires_grad=False)` (the caffe
  backbones of FCOS): every BN scale / bias gets no gradient (`stop_gradient` on the parameters, so
  they add nothing to a clipped gradient norm either) and, through `frozen_param_mask`, no update
  and no weight decay. They stay parameters (counted, saved, loaded).

Parameter names follow torchvision's (`conv1`, `bn1`, `layer1_0/conv2`, `layer1_0/downsample_0`, ...),
so that converted checkpoints map one to one.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.registry import BACKBONES, Part
from jaxdet.ops.pooling import max_pool2d

_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                 152: (3, 8, 36, 3)}


def conv(features, kernel, stride=1, name=None, dtype=None):
  """A bias-free conv with PyTorch padding (kernel // 2 on every side)."""
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), use_bias=False, name=name, dtype=dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Output channels = planes."""
  planes: int
  stride: int = 1
  downsample: bool = False
  style: str = 'pytorch'
  norm: Callable[..., Any] = None  # norm(name=...) -> a BatchNorm layer
  dtype: jnp.dtype = None
  expansion = 1

  @nn.compact
  def __call__(self, x):
    identity = x
    y = nn.relu(self.norm(name='bn1')(conv(self.planes, 3, self.stride, 'conv1', self.dtype)(x)))
    y = self.norm(name='bn2')(conv(self.planes, 3, 1, 'conv2', self.dtype)(y))
    if self.downsample:
      identity = self.norm(name='downsample_1')(
          conv(self.planes, 1, self.stride, 'downsample_0', self.dtype)(x))
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (ResNet-50/101/152). Output channels = 4 * planes."""
  planes: int
  stride: int = 1
  downsample: bool = False
  style: str = 'pytorch'
  norm: Callable[..., Any] = None  # norm(name=...) -> a BatchNorm layer
  dtype: jnp.dtype = None
  expansion = 4

  @nn.compact
  def __call__(self, x):
    s1, s3 = (1, self.stride) if self.style == 'pytorch' else (self.stride, 1)
    identity = x
    y = nn.relu(self.norm(name='bn1')(conv(self.planes, 1, s1, 'conv1', self.dtype)(x)))
    y = nn.relu(self.norm(name='bn2')(conv(self.planes, 3, s3, 'conv2', self.dtype)(y)))
    y = self.norm(name='bn3')(conv(self.planes * 4, 1, 1, 'conv3', self.dtype)(y))
    if self.downsample:
      identity = self.norm(name='downsample_1')(
          conv(self.planes * 4, 1, self.stride, 'downsample_0', self.dtype)(x))
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """ResNet without the classifier.

  Input `x: (B, H, W, 3)` normalised image; returns a tuple of the feature maps of the stages in
  `out_indices` (0-based: stage i has stride 2 ** (i + 2) and `base_width * 2 ** i * expansion`
  channels: 256, 512, 1024, 2048 for R50).
  """
  depth: int = 50
  style: str = 'pytorch'
  out_indices: Sequence[int] = (0, 1, 2, 3)
  frozen_stages: int = 1
  norm_eval: bool = True
  norm_trainable: bool = True
  base_width: int = 64
  bn_eps: float = 1e-5
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in _STAGE_BLOCKS:
      raise ValueError(f'ResNet depth={self.depth} is not one of {sorted(_STAGE_BLOCKS)}')
    if self.style not in ('pytorch', 'caffe'):
      raise ValueError(f"ResNet style={self.style!r} must be 'pytorch' or 'caffe'")
    block_cls = BasicBlock if self.depth < 50 else Bottleneck
    use_running = self.norm_eval or not train
    norm = _NormFactory(use_running, self.bn_eps, self.dtype, self.norm_trainable)

    x = nn.relu(norm(name='bn1')(conv(self.base_width, 7, 2, 'conv1', self.dtype)(x)))
    x = max_pool2d(x, (3, 3), (2, 2), (1, 1))
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    outs = []
    in_ch = self.base_width
    for i, num_blocks in enumerate(_STAGE_BLOCKS[self.depth]):
      planes = self.base_width * 2 ** i
      for j in range(num_blocks):
        stride = (1 if i == 0 else 2) if j == 0 else 1
        out_ch = planes * block_cls.expansion
        x = block_cls(planes, stride, downsample=(j == 0 and (stride != 1 or in_ch != out_ch)),
                      style=self.style, norm=norm, dtype=self.dtype,
                      name=f'layer{i + 1}_{j}')(x)
        in_ch = out_ch
      if i + 1 <= self.frozen_stages:
        x = jax.lax.stop_gradient(x)
      if i in self.out_indices:
        outs.append(x)
    return tuple(outs)


class _NoGradBatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` whose scale and bias pass no gradient (torch's requires_grad=False on BN).

  Same parameters, names and statistics as `nn.BatchNorm`; only the values it reads from
  `self.param` are wrapped in `stop_gradient`.
  """

  def param(self, name, init_fn, *args, **kwargs):
    return jax.lax.stop_gradient(super().param(name, init_fn, *args, **kwargs))


class _NormFactory:
  """Builds the blocks' BatchNorm layers with the backbone's settings (a picklable callable)."""

  def __init__(self, use_running, eps, dtype, trainable=True):
    self.use_running, self.eps, self.dtype = use_running, eps, dtype
    self.cls = nn.BatchNorm if trainable else _NoGradBatchNorm

  def __call__(self, name):
    return self.cls(use_running_average=self.use_running, momentum=0.9, epsilon=self.eps,
                    name=name, dtype=self.dtype)


def frozen_param_mask(params, frozen_stages, norm_trainable=True):
  """A pytree of bools over a ResNet's `params`: True for parameters that never train.

  Those of frozen stages and, with `norm_trainable=False`, the scale and bias of every BN layer
  (a ResNet's convs have no bias, so its only `scale` / `bias` leaves are BN's). For the optimizer
  (no update, no weight decay) -- mmdetection sets requires_grad=False on them.
  """
  frozen = {'conv1', 'bn1'} if frozen_stages >= 0 else set()
  prefixes = tuple(f'layer{i}_' for i in range(1, frozen_stages + 1))

  def is_frozen(path):
    top = path[0].key
    if not norm_trainable and path[-1].key in ('scale', 'bias'):
      return True
    return top in frozen or (bool(prefixes) and top.startswith(prefixes))

  return jax.tree_util.tree_map_with_path(lambda p, _: is_frozen(p), params)


def from_config(cfg, dtype=None):
  """The ResNet of `config.model.backbone` (type 'resnet')."""
  return ResNet(depth=cfg.depth, style=cfg.style, out_indices=tuple(cfg.out_indices),
                frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                norm_trainable=cfg.get('norm_trainable', True), base_width=cfg.base_width,
                bn_eps=cfg.get('bn_eps', 1e-5), dtype=dtype)


def frozen_from_config(params, cfg):
  """`frozen_param_mask` with `config.model.backbone`'s frozen_stages and norm_trainable."""
  return frozen_param_mask(params, cfg.frozen_stages,
                           norm_trainable=cfg.get('norm_trainable', True))


# torchvision's and mmdetection's ResNet names (both styles): (torch module path, jax path).
TORCH_NAMES = (
    (r'(conv1|bn1)', r'\1'),                                          # the stem
    (r'layer(\d+)\.(\d+)\.(conv\d|bn\d)', r'layer\1_\2/\3'),         # block convs / norms
    (r'layer(\d+)\.(\d+)\.downsample\.([01])', r'layer\1_\2/downsample_\3'),
)
TORCH_SKIP = (r'fc\.(weight|bias)',)  # the ImageNet classifier

BACKBONES.register('resnet', Part(build=from_config, frozen=frozen_from_config,
                                  torch_names=TORCH_NAMES, torch_skip=TORCH_SKIP))
