"""Optimizers as mmdetection's `optim_wrapper` (jaxdet/engine/optimizer.py builds them).

`base_lr` is for a global batch of `base_batch` images (scaled linearly to the real batch at
start). `paramwise` holds mmengine's paramwise_cfg: bias_lr_mult, bias_decay_mult,
norm_decay_mult (1.0 here: the same numbers as mmengine's "not set"; None is "not set" too, which
matters where bias_decay_mult is set and norm_decay_mult is not: mmengine then decays norm biases
by bias_decay_mult), dcn_offset_lr_mult where set, and custom_keys, e.g. DETR's

  config.optimizer.paramwise.custom_keys['backbone'] = dict(lr_mult=0.1, decay_mult=1.0)

(a key matches a parameter whose '/'-joined Flax path contains it; longest key first).
"""
import ml_collections


def _paramwise():
  return dict(bias_lr_mult=1.0, bias_decay_mult=1.0, norm_decay_mult=1.0, custom_keys={})


def sgd(base_lr=0.01, weight_decay=1e-4, momentum=0.9):
  """torch SGD (coupled weight decay, momentum without dampening): mmdetection's default."""
  return ml_collections.ConfigDict(dict(
      name='sgd', base_lr=base_lr, base_batch=16, momentum=momentum, weight_decay=weight_decay,
      grad_clip=ml_collections.config_dict.placeholder(float),
      paramwise=_paramwise(),
  ))


def adamw(base_lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8):
  """torch AdamW (decoupled weight decay lr * wd); defaults are mmdetection DETR's optimizer."""
  return ml_collections.ConfigDict(dict(
      name='adamw', base_lr=base_lr, base_batch=16, betas=tuple(betas), eps=eps,
      weight_decay=weight_decay, grad_clip=ml_collections.config_dict.placeholder(float),
      paramwise=_paramwise(),
  ))
