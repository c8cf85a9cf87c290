"""Detectors: backbone + neck + head as one Flax module, and the detector's loss / predict.

`build_detector(config.model)` returns a `DetectorModel`:
  module   a `SingleStageDetector` (Flax Linen): `module.apply(variables, images, train=...)`
           -> the head's raw per-level outputs. `images` are normalised, NHWC float.
  loss     `loss(outputs, batch, *, axis_name=None) -> dict of scalars` (pure; `loss_*` keys are
           summed into the training loss; `axis_name` names the device axis for mmdetection's
           cross-device normalisers, None on one device).
  predict  `predict(outputs, batch) -> Predictions` with a leading batch axis, boxes in
           original-image pixels.
Nothing here knows about pmap or the data pipeline.
"""
import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxdet.models.backbones import ResNet
from jaxdet.models.heads import atss_head
from jaxdet.models.heads import fcos_head
from jaxdet.models.heads import retina_head
from jaxdet.models.necks import FPN


class SingleStageDetector(nn.Module):
  """images (B, H, W, 3) normalised -> the head's outputs (tuples over pyramid levels)."""
  backbone: nn.Module
  neck: nn.Module
  head: nn.Module

  def __call__(self, images, train: bool = False):
    return self.head(self.neck(self.backbone(images, train=train)))


@dataclasses.dataclass(frozen=True)
class DetectorModel:
  module: nn.Module
  loss: Callable
  predict: Callable


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(name):
  if name not in _DTYPES:
    raise ValueError(f"config.dtype={name!r} must be one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def build_backbone(cfg, dtype=None):
  if cfg.type != 'resnet':
    raise ValueError(f"model.backbone.type={cfg.type!r} is not supported (have: 'resnet')")
  return ResNet(depth=cfg.depth, style=cfg.style, out_indices=tuple(cfg.out_indices),
                frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                norm_trainable=cfg.get('norm_trainable', True),
                base_width=cfg.base_width, dtype=dtype)


def build_neck(cfg, dtype=None):
  if cfg.type != 'fpn':
    raise ValueError(f"model.neck.type={cfg.type!r} is not supported (have: 'fpn')")
  return FPN(out_channels=cfg.out_channels, num_outs=cfg.num_outs, start_level=cfg.start_level,
             add_extra_convs=cfg.add_extra_convs,
             relu_before_extra_convs=cfg.relu_before_extra_convs, dtype=dtype)


# model.type -> the head's `DenseDetectorHead` (module, loss, predict); one line per detector.
_HEADS = {
    'atss': atss_head.HEAD,
    'fcos': fcos_head.HEAD,
    'retinanet': retina_head.HEAD,
}


def build_detector(model_cfg, dtype='float32'):
  """The `DetectorModel` for `config.model` (`model.type` picks the head, see `_HEADS`)."""
  if model_cfg.type not in _HEADS:
    raise ValueError(f"model.type={model_cfg.type!r} must be one of {sorted(_HEADS)}")
  head = _HEADS[model_cfg.type]
  dt = compute_dtype(dtype)
  dt = None if dt == jnp.float32 else dt
  module = SingleStageDetector(backbone=build_backbone(model_cfg.backbone, dt),
                               neck=build_neck(model_cfg.neck, dt),
                               head=head.module(model_cfg.head, model_cfg.num_classes, dt))
  return DetectorModel(module=module,
                  loss=functools.partial(head.loss, head_cfg=model_cfg.head),
                  predict=functools.partial(head.predict, head_cfg=model_cfg.head,
                                            test_cfg=model_cfg.test_cfg))
