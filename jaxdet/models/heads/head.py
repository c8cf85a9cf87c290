"""The head protocol: what a detector family adds to a backbone and a neck.

A `Head` is three functions of the config's `model.head` section, registered by name in
`jaxdet.models.registry.HEADS` (key: `config.model.type`), plus its PyTorch names:

  module(head_cfg, num_classes, dtype) -> a Flax module, called by the detector as
      head(feats, img_shape=(B, 2) int32, input_shape=(H, W), train=bool) -> raw outputs (a pytree)
    feats: the neck's tuple of NHWC maps; img_shape: each image's (h, w) before padding;
    input_shape: the padded batch's static (H, W). Dense heads use only `feats`; DETR builds its
    padding mask from the other two.
  loss(outputs, batch, head_cfg, *, axis_name=None) -> {'loss_*': scalar, other metrics}
    batch: one device's `gt_boxes (B, G, 4)` xyxy input pixels, `gt_labels (B, G)`,
    `gt_mask (B, G)`, `img_shape`, `pad_shape (B, 2)`, `image_valid (B,)`. Images with
    image_valid False (evaluation padding) contribute nothing. `loss_*` terms are summed into the
    training loss; `axis_name` names the device axis for cross-device normalisers (None: one
    device), see `jaxdet.losses.mean_over_devices`.
  predict(outputs, batch, head_cfg, test_cfg) -> `jaxdet.ops.nms.Predictions` (B, K, ...): boxes in
    original-image pixels, fixed size K with a valid mask. Dense heads decode, filter and run
    NMS (`jaxdet.models.postprocess.predict_batch`); a set-prediction head (DETR) need not.
  torch_names: ((regex, template), ...) for mmdetection's tensors of the head, relative to
    `torch_prefix` ('bbox_head.'; DETR keeps its transformer at the detector's top level: '').
"""
import dataclasses
from typing import Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Head:
  """A detector family's head: module, loss, predict and PyTorch names (see module docstring)."""
  module: Callable
  loss: Callable
  predict: Callable
  torch_names: tuple = ()
  torch_prefix: str = 'bbox_head.'


def image_valid(batch):
  """(B,) bool: the batch's `image_valid`, all True when the batch has none (hand-made batches)."""
  if 'image_valid' in batch:
    return jnp.asarray(batch['image_valid'], bool)
  return jnp.ones(batch['gt_mask'].shape[:1], bool)
