"""DETR's head (Carion et al. 2020) as mmdetection 3.3's `DETR` + `DETRHead`: network and prediction.

jaxdet's DETR head is everything after the input projection (the `ChannelMapper` neck): the
padding mask, the sine positional encoding, the transformer encoder and decoder, the learned
queries and the class / box branches. mmdetection keeps the transformer in its `DETR` detector
and only the branches in `DETRHead`; the computation is the same.

Network (`DETRHead`), for the neck's last map `feat` (B, h, w, D):
  - padding mask (B, h, w) bool, True = padded: built at the padded input size (H, W) from each
    image's `img_shape` and resized to (h, w) by nearest neighbour (`padding_mask`, torch's
    `F.interpolate(mode='nearest')` index rule), as mmdetection's `DETR.pre_transformer`;
  - pos = `sine_positional_encoding(mask)` (D / 2 features per axis, normalised);
  - memory = encoder(feat, pos, mask) (B, h w, D);
  - hidden = decoder(query = 0, query_pos = `query_embedding` (Q, D), memory, pos, mask):
    (L, B, Q, D), the final LayerNorm applied to every layer's output;
  - `fc_cls`: D -> num_classes + 1 logits (softmax; background is the LAST class);
    `reg_ffn` (Linear D -> D, ReLU, Linear D -> D), ReLU, `fc_reg` D -> 4, sigmoid: boxes as
    normalised (cx, cy, w, h) of each image's unpadded size.
  Outputs `(cls_scores (L, B, Q, C + 1), bbox_preds (L, B, Q, 4))`, float32, every decoder layer.
  Initialisation: transformer as `jaxdet.models.layers.transformer`; query_embedding N(0, 1)
  (torch's nn.Embedding); the branches torch's Linear default (mmdetection's DETRHead has no
  init of its own).

Prediction (`detr_predict`, mmdetection's `DETRHead.predict_by_feat`): the last layer only;
softmax, drop the background column, each query's best class and its probability; the top
`test_cfg.max_per_img` queries by that score (all of them valid, no score threshold, no NMS);
boxes to xyxy input pixels of the image's `img_shape`, clipped to it, then to original-image
pixels (`boxes_to_original`).

The loss (Hungarian matching + CE / L1 / GIoU of every decoder layer) is in `detr_loss.py`.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models.heads.detr_loss import detr_loss
from jaxdet.models.heads.head import Head
from jaxdet.models.layers.positional_encoding import sine_positional_encoding
from jaxdet.models.layers.transformer import (FFN, DetrDecoder, DetrEncoder,
                                              torch_linear_bias_init, torch_linear_kernel_init)
from jaxdet.ops.boxes import box_cxcywh_to_xyxy, boxes_to_original, clip_boxes
from jaxdet.models.registry import HEADS
from jaxdet.ops.nms import Predictions


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index of torch's `F.interpolate(mode='nearest', size=...)`:
  floor(i * (in / out)) with the scale in float32, capped at in - 1."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def padding_mask(img_shape, input_shape, feat_shape):
  """(B, h, w) bool, True where the feature map looks at padding.

  Args:
    img_shape: (B, 2) int, each image's (h, w) before padding (bottom / right).
    input_shape: the padded batch's static (H, W).
    feat_shape: the feature map's static (h, w).
  """
  ys = jnp.asarray(nearest_indices(input_shape[0], feat_shape[0]))
  xs = jnp.asarray(nearest_indices(input_shape[1], feat_shape[1]))
  img_shape = jnp.asarray(img_shape)
  pad_y = ys[None, :] >= img_shape[:, 0:1]   # (B, h)
  pad_x = xs[None, :] >= img_shape[:, 1:2]   # (B, w)
  return pad_y[:, :, None] | pad_x[:, None, :]


class DETRHead(nn.Module):
  """feats (tuple of NHWC maps, the last used) -> (cls_scores, bbox_preds) of every decoder layer
  (see the module docstring)."""
  num_classes: int
  embed_dims: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  feedforward_channels: int = 2048
  dropout: float = 0.1
  num_queries: int = 100
  pos_temperature: float = 10000.
  dtype: Any = None

  @nn.compact
  def __call__(self, feats, img_shape=None, input_shape=None, train: bool = False):
    feat = feats[-1]
    b, h, w, d = feat.shape
    if d != self.embed_dims:
      raise ValueError(f'DETR head: the neck gives {d} channels, model.head.embed_dims is '
                       f'{self.embed_dims}')
    if self.embed_dims % 2:
      raise ValueError(f'model.head.embed_dims={self.embed_dims} must be even (D / 2 '
                       'positional features per axis)')
    if img_shape is None or input_shape is None:  # every image fills the batch
      mask = jnp.zeros((b, h, w), bool)
    else:
      mask = padding_mask(img_shape, input_shape, (h, w))
    pos = sine_positional_encoding(mask, num_feats=d // 2, temperature=self.pos_temperature,
                                   normalize=True, scale=2 * math.pi, eps=1e-6, offset=0.)
    dt = self.dtype or jnp.float32
    x = feat.reshape(b, h * w, d)                  # (B, N, D) tokens, row-major over (h, w)
    pos = pos.reshape(b, h * w, d).astype(dt)
    mask = mask.reshape(b, h * w)
    common = dict(embed_dims=d, num_heads=self.num_heads,
                  feedforward_channels=self.feedforward_channels, dropout=self.dropout,
                  dtype=self.dtype)
    memory = DetrEncoder(self.num_encoder_layers, **common, name='encoder')(
        x, pos, mask, train=train)
    query_pos = nn.Embed(self.num_queries, d, embedding_init=nn.initializers.normal(1.),
                         name='query_embedding')(jnp.arange(self.num_queries))[None].astype(dt)
    query = jnp.zeros((b, self.num_queries, d), dt)
    hidden = DetrDecoder(self.num_decoder_layers, **common, name='decoder')(
        query, query_pos, memory, pos, mask, train=train)  # (L, B, Q, D)

    linear = lambda n, fan_in, name: nn.Dense(
        n, kernel_init=torch_linear_kernel_init, bias_init=torch_linear_bias_init(fan_in),
        dtype=self.dtype, name=name)
    cls_scores = linear(self.num_classes + 1, d, 'fc_cls')(hidden)
    reg = FFN(d, d, dropout=0., add_identity=False, kernel_init=torch_linear_kernel_init,
              dtype=self.dtype, name='reg_ffn')(hidden)
    bbox_preds = jax.nn.sigmoid(linear(4, d, 'fc_reg')(nn.relu(reg)).astype(jnp.float32))
    return cls_scores.astype(jnp.float32), bbox_preds


def detr_head_module(head_cfg, num_classes, dtype=None):
  """The DETR head of `config.model.head`."""
  return DETRHead(num_classes=num_classes, embed_dims=head_cfg.embed_dims,
                  num_heads=head_cfg.num_heads,
                  num_encoder_layers=head_cfg.num_encoder_layers,
                  num_decoder_layers=head_cfg.num_decoder_layers,
                  feedforward_channels=head_cfg.feedforward_channels,
                  dropout=head_cfg.dropout, num_queries=head_cfg.num_queries,
                  pos_temperature=head_cfg.get('pos_temperature', 10000.), dtype=dtype)


def detr_predict_one(cls_score, bbox_pred, meta, *, max_per_img):
  """One image: cls_score (Q, C + 1) logits, bbox_pred (Q, 4) normalised cxcywh of the last
  layer; meta with img_shape (2,), scale_factor (2,), offset (2,), flip () -> Predictions with
  K = min(max_per_img, Q) slots, best first, boxes in original-image pixels."""
  num_queries = cls_score.shape[0]
  k = min(int(max_per_img), num_queries)
  probs = jax.nn.softmax(cls_score.astype(jnp.float32), axis=-1)[:, :-1]
  scores, labels = probs.max(axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)
  top_scores, index = jax.lax.top_k(scores, k)
  img_h = meta['img_shape'][0].astype(jnp.float32)
  img_w = meta['img_shape'][1].astype(jnp.float32)
  boxes = box_cxcywh_to_xyxy(bbox_pred[index]) * jnp.stack([img_w, img_h, img_w, img_h])
  boxes = clip_boxes(boxes, (img_h, img_w))
  boxes = boxes_to_original(boxes, meta)
  return Predictions(boxes=boxes, scores=top_scores, labels=labels[index],
                     index=index.astype(jnp.int32), valid=jnp.ones((k,), bool))


def detr_predict(outputs, batch, head_cfg, test_cfg):
  """Detections of every image of the batch (Predictions with a leading batch axis, K =
  min(test_cfg.max_per_img, num_queries)), boxes in original-image pixels. `batch` needs
  img_shape, scale_factor, flip (and offset, default 0) (B, ...)."""
  del head_cfg
  cls_scores, bbox_preds = outputs
  meta = {'img_shape': jnp.asarray(batch['img_shape']),
          'scale_factor': jnp.asarray(batch['scale_factor'], jnp.float32),
          'flip': jnp.asarray(batch['flip'], bool)}
  meta['offset'] = (jnp.asarray(batch['offset'], jnp.float32) if 'offset' in batch
                    else jnp.zeros_like(meta['scale_factor']))
  one = lambda c, b, m: detr_predict_one(c, b, m, max_per_img=test_cfg.max_per_img)
  return jax.vmap(one)(cls_scores[-1], bbox_preds[-1], meta)


# mmdetection's names of this head's tensors, from the detector's top level (the transformer and
# the queries belong to mmdetection's `DETR`, the branches to its `bbox_head`):
# ((torch module path regex, jax module path under 'head'), ...). Leaves: `weight` 2-d -> kernel
# (transposed), 1-d -> LayerNorm scale; `in_proj_weight` / `in_proj_bias` (torch's fused
# in-projection) -> `in_proj/kernel` (transposed) / `in_proj/bias`; `query_embedding.weight` ->
# `query_embedding/embedding` (not transposed).
_LAYER = r'(encoder|decoder)\.layers\.(\d+)'
TORCH_NAMES = (
    (_LAYER + r'\.(self_attn|cross_attn)\.attn', r'\1/layers_\2/\3'),
    (_LAYER + r'\.(self_attn|cross_attn)\.attn\.out_proj', r'\1/layers_\2/\3/out_proj'),
    (_LAYER + r'\.ffn\.layers\.0\.0', r'\1/layers_\2/ffn/layers_0_0'),
    (_LAYER + r'\.ffn\.layers\.1', r'\1/layers_\2/ffn/layers_1'),
    (_LAYER + r'\.norms\.(\d)', r'\1/layers_\2/norms_\3'),
    (r'decoder\.post_norm', r'decoder/post_norm'),
    (r'query_embedding', r'query_embedding'),
    (r'bbox_head\.fc_(cls|reg)', r'fc_\1'),
    (r'bbox_head\.reg_ffn\.layers\.0\.0', r'reg_ffn/layers_0_0'),
    (r'bbox_head\.reg_ffn\.layers\.1', r'reg_ffn/layers_1'),
)

HEAD = HEADS.register('detr', Head(module=detr_head_module, loss=detr_loss, predict=detr_predict,
                                   torch_names=TORCH_NAMES, torch_prefix=''))
