"""Registries of the parts a detector is built from: backbones, necks and heads, by config name.

  BACKBONES  config.model.backbone.type -> `Part`   ('resnet', ...)
  NECKS      config.model.neck.type     -> `Part`   ('fpn', ...)
  HEADS      config.model.type          -> `jaxdet.models.heads.head.Head` ('atss', ...)

A `Part` owns the facts about one backbone or neck that shared code must not know:
  build(cfg, dtype) -> the Flax module (cfg: that part's config section; dtype None = float32);
  frozen(params, cfg) -> a pytree of bools over the part's params, True for those that never
    train (no update, no weight decay); None: everything trains;
  torch_names: ((torch module path regex, jax module path template), ...) relative to the part:
    PyTorch names (torchvision / mmdetection) of its tensors, for pretrained weights and
    mmdetection conversion (`jaxdet.models.weights` adds the 'backbone.' / 'neck.' prefixes);
  torch_skip: regexes of whole tensor names of an ImageNet file that are dropped (a classifier).

The module files register themselves; `jaxdet.models.detectors` imports them all, so a new part
is one file plus one import line there.
"""
import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Part:
  """A registered backbone or neck (see the module docstring)."""
  build: Callable
  frozen: Optional[Callable] = None
  torch_names: tuple = ()
  torch_skip: tuple = ()


class Registry:
  """name -> entry; `key` names the config key in errors (e.g. 'model.backbone.type')."""

  def __init__(self, key: str):
    self.key = key
    self._entries = {}

  def register(self, name: str, entry):
    if name in self._entries:
      raise ValueError(f'{self.key}={name!r} is registered twice')
    self._entries[name] = entry
    return entry

  def get(self, name: str):
    if name not in self._entries:
      raise ValueError(f'{self.key}={name!r} must be one of {sorted(self._entries)}')
    return self._entries[name]

  def __contains__(self, name):
    return name in self._entries

  def names(self):
    return sorted(self._entries)


BACKBONES = Registry('model.backbone.type')
NECKS = Registry('model.neck.type')
HEADS = Registry('model.type')
