"""Detectors: backbone + neck + head as one Flax module, and the detector's loss / predict / init.

`build_detector(config.model)` returns a `DetectorModel`:
  module   a `SingleStageDetector` (Flax Linen):
           `module.apply(variables, images, img_shape, train=..., rngs={'dropout': key})` -> the
           head's raw outputs. `images` (B, H, W, 3) normalised NHWC float, padded bottom/right;
           `img_shape` (B, 2) int32 each image's (h, w) before padding.
  loss     `loss(outputs, batch, *, axis_name=None) -> dict of scalars` (pure; `loss_*` keys are
           summed into the training loss; `axis_name` names the device axis for mmdetection's
           cross-device normalisers, None on one device; images with `image_valid` False add
           nothing).
  predict  `predict(outputs, batch) -> jaxdet.ops.nms.Predictions` with a leading batch axis,
           boxes in original-image pixels.
  init     `init(key, input_shape) -> variables` ({'params', 'batch_stats'?}) for images of
           `input_shape` (B, H, W, 3), a static tuple; every caller initialises here
           (`init_shapes(input_shape)`: the same as ShapeDtypeStructs).
The parts come from the registries (`jaxdet.models.registry`): `model.backbone.type`,
`model.neck.type` and `model.type` (the head). Nothing here knows about pmap or the data
pipeline.
"""
import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Importing the part modules registers them (one line per file). pylint: disable=unused-import
from jaxdet.models.backbones import resnet, vgg  # noqa: F401
from jaxdet.models.heads import atss_head, fcos_head, nasfcos_head, retina_head  # noqa: F401
from jaxdet.models.heads import ssd_head  # noqa: F401
from jaxdet.models.heads import detr_head  # noqa: F401
from jaxdet.models.necks import fpn, nasfcos_fpn, ssd_neck  # noqa: F401
from jaxdet.models.necks import channel_mapper  # noqa: F401
from jaxdet.models.registry import BACKBONES, HEADS, NECKS


class SingleStageDetector(nn.Module):
  """images (B, H, W, 3) normalised + img_shape (B, 2) -> the head's raw outputs."""
  backbone: nn.Module
  neck: nn.Module
  head: nn.Module

  def __call__(self, images, img_shape=None, train: bool = False):
    if img_shape is None:  # every image fills the batch's padded size
      img_shape = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32),
                                   (images.shape[0], 2))
    feats = self.neck(self.backbone(images, train=train), train=train)
    return self.head(feats, img_shape=img_shape, input_shape=tuple(images.shape[1:3]),
                     train=train)


@dataclasses.dataclass(frozen=True)
class DetectorModel:
  """A detector's module and its pure functions (see the module docstring)."""
  module: nn.Module
  loss: Callable
  predict: Callable

  def init(self, key, input_shape):
    """Variables for images of `input_shape` (B, H, W, 3): `module.init` with zero inputs in
    test mode (no dropout randomness needed)."""
    images = jnp.zeros(tuple(input_shape), jnp.float32)
    img_shape = jnp.broadcast_to(jnp.asarray(input_shape[1:3], jnp.int32), (input_shape[0], 2))
    return self.module.init(key, images, img_shape, train=False)

  def init_shapes(self, input_shape):
    """`init`'s variables as ShapeDtypeStructs, nothing allocated (parameter counts, checks)."""
    return jax.eval_shape(lambda key: self.init(key, tuple(input_shape)), jax.random.key(0))


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(name):
  if name not in _DTYPES:
    raise ValueError(f"config.dtype={name!r} must be one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def build_backbone(cfg, dtype=None):
  """The backbone module of `config.model.backbone` (registry key `type`)."""
  return BACKBONES.get(cfg.type).build(cfg, dtype)


def build_neck(cfg, dtype=None):
  """The neck module of `config.model.neck` (registry key `type`)."""
  return NECKS.get(cfg.type).build(cfg, dtype)


def build_detector(model_cfg, dtype='float32'):
  """The `DetectorModel` for `config.model` (`model.type` picks the head in `HEADS`)."""
  head = HEADS.get(model_cfg.type)
  dt = compute_dtype(dtype)
  dt = None if dt == jnp.float32 else dt
  module = SingleStageDetector(backbone=build_backbone(model_cfg.backbone, dt),
                               neck=build_neck(model_cfg.neck, dt),
                               head=head.module(model_cfg.head, model_cfg.num_classes, dt))
  return DetectorModel(module=module,
                       loss=functools.partial(head.loss, head_cfg=model_cfg.head),
                       predict=functools.partial(head.predict, head_cfg=model_cfg.head,
                                                 test_cfg=model_cfg.test_cfg))
