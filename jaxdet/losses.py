"""Detection losses as pure functions, with mmdetection 3.3's formulas and reductions.

Every loss takes an optional ``weights`` array (a mask or soft weights, broadcast against the
element-wise loss from the left: ``(N,)`` weights apply to every column of an ``(N, C)`` loss)
and reduces as mmdetection's ``weight_reduce_loss``:

  reduction='none'  the weighted element-wise loss;
  reduction='sum'   its sum;
  reduction='mean'  its mean over *all* elements, or ``sum / (avg_factor + eps)`` when an
                    ``avg_factor`` is given (eps = float32 machine eps, as mmdetection).

With fixed shapes the usual call is ``weights=positive_mask, avg_factor=num_positives``.
``cross_entropy`` differs for 'mean' without ``avg_factor`` (PyTorch's weighted mean, see there).
The ``loss_weight`` of mmdetection's loss modules is left to the caller (multiply).

Label conventions:
  sigmoid_focal_loss   labels (N,) int, 0..C-1 a class, anything else (-1, or C) background;
                       or float targets with the logits' shape.
  cross_entropy        labels (N,) int in 0..K-1 over the K logits (background is a class of
                       its own, e.g. index C in DETR); negative labels are ignored.
  ssd_hard_negative_ce labels (A,) int, 0..C-1 a class, C (mmdetection) or -1 background.
"""
import functools

import jax
import jax.numpy as jnp

from jaxdet.ops.boxes import box_iou_aligned, generalized_box_iou_aligned

EPS_F32 = float(jnp.finfo(jnp.float32).eps)
REDUCTIONS = ("none", "mean", "sum")


def mean_over_devices(x, axis_name):
  """mmdetection's ``reduce_mean``: the mean of ``x`` over the device axis ``axis_name`` (the
  identity for None, one device). The only place where losses see the device axis."""
  return jax.lax.pmean(x, axis_name) if axis_name is not None else x


def reduce_loss(loss, weights=None, *, reduction="mean", avg_factor=None):
  """Weight an element-wise ``loss`` and reduce it (mmdetection's ``weight_reduce_loss``)."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if avg_factor is not None and reduction == "sum":
    raise ValueError('avg_factor can not be used with reduction="sum"')
  if weights is not None:
    loss = loss * _expand_like(jnp.asarray(weights, loss.dtype), loss, "weights")
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  if avg_factor is None:
    return loss.mean()
  return loss.sum() / (avg_factor + EPS_F32)


def _expand_like(weights, loss, name):
  """A prefix-shaped ``weights`` gets trailing axes (per-row weight); one of the loss's rank
  must broadcast to it."""
  if weights.ndim <= loss.ndim and weights.shape == loss.shape[:weights.ndim]:
    return weights.reshape(weights.shape + (1,) * (loss.ndim - weights.ndim))
  try:
    fits = (weights.ndim == loss.ndim
            and jnp.broadcast_shapes(weights.shape, loss.shape) == loss.shape)
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"{name} of shape {weights.shape} does not fit a loss of shape {loss.shape}")
  return weights


def sigmoid_focal_loss(logits, targets, weights=None, *, alpha=0.25, gamma=2.0,
                       reduction="mean", avg_factor=None):
  """Focal loss (Lin et al. 2017) on per-class sigmoid logits, mmdetection's ``FocalLoss``.

  loss = BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * p_wrong ** gamma, with
  p_wrong = t * sigmoid(-x) + (1 - t) * sigmoid(x).  BCE uses log_sigmoid, so it is exact and
  finite (with finite gradients) for logits far beyond +-100. Int labels take
  ``binary_focal_loss`` (one exp and one log1p per element, closed-form gradient).

  Args:
    logits: (..., C) float.
    targets: (...) int labels -- a class in 0..C-1, anything else background (-1 or C) --
      or (..., C) float (one-hot or soft) targets.
    weights: (...) or (..., C).
    alpha, gamma: Python numbers.
  """
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets)
  if targets.shape == logits.shape[:-1] and jnp.issubdtype(targets.dtype, jnp.integer):
    is_target = targets[..., None] == jnp.arange(logits.shape[-1])
    loss = binary_focal_loss(logits, is_target, float(alpha), float(gamma))
    return reduce_loss(loss, weights, reduction=reduction, avg_factor=avg_factor)
  if targets.shape != logits.shape:
    raise ValueError(f"targets must be int labels of shape {logits.shape[:-1]} or one-hot of "
                     f"shape {logits.shape}, got {targets.shape} {targets.dtype}")
  t = targets.astype(logits.dtype)
  bce = -(t * jax.nn.log_sigmoid(logits) + (1 - t) * jax.nn.log_sigmoid(-logits))
  p_wrong = t * jax.nn.sigmoid(-logits) + (1 - t) * jax.nn.sigmoid(logits)
  focal_weight = (alpha * t + (1 - alpha) * (1 - t)) * p_wrong**gamma
  return reduce_loss(bce * focal_weight, weights, reduction=reduction, avg_factor=avg_factor)


def _focal_terms(x, is_target, alpha):
  """With z = -x for a target, x otherwise (the logit of the wrong answer): the weight a_t,
  s = sigmoid(z) (p_wrong), 1 - s and softplus(z) (the BCE), from one exp and one log1p."""
  z = jnp.where(is_target, -x, x)
  e = jnp.exp(-jnp.abs(z))
  r = 1 / (1 + e)
  nonneg = z >= 0
  s, one_minus_s = jnp.where(nonneg, r, e * r), jnp.where(nonneg, e * r, r)
  bce = jnp.maximum(z, 0) + jnp.log1p(e)
  a_t = jnp.where(is_target, alpha, 1 - alpha)
  return a_t, s, one_minus_s, bce


def _pow(s, gamma):
  return s * s if gamma == 2.0 else s**gamma


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def binary_focal_loss(logits, is_target, alpha, gamma):
  """Element-wise focal loss a_t * s**gamma * softplus(z) of ``logits`` (..., C) against boolean
  ``is_target`` (same shape), z and s as in ``_focal_terms``; ``sigmoid_focal_loss``'s values.
  The gradient is closed-form: d/dz = a_t s**gamma (gamma (1 - s) softplus(z) + s), exact at
  z = 0 and for any |z|; ``alpha`` and ``gamma`` are Python numbers."""
  a_t, s, _, bce = _focal_terms(logits, is_target, alpha)
  return a_t * _pow(s, gamma) * bce


def _binary_focal_fwd(logits, is_target, alpha, gamma):
  return binary_focal_loss(logits, is_target, alpha, gamma), (logits, is_target)


def _binary_focal_bwd(alpha, gamma, residuals, g):
  logits, is_target = residuals
  a_t, s, one_minus_s, bce = _focal_terms(logits, is_target, alpha)
  d_z = a_t * _pow(s, gamma) * (gamma * one_minus_s * bce + s)
  return g * jnp.where(is_target, -d_z, d_z), None


binary_focal_loss.defvjp(_binary_focal_fwd, _binary_focal_bwd)


def binary_cross_entropy_with_logits(logits, targets, weights=None, *, reduction="mean",
                                     avg_factor=None):
  """Element-wise ``-(t log sigmoid(x) + (1 - t) log sigmoid(-x))``; targets in [0, 1].

  mmdetection's ``CrossEntropyLoss(use_sigmoid=True)`` on same-shape targets (FCOS / ATSS
  centerness: logits (P,), targets ``centerness_target``, avg_factor num_pos).
  """
  logits = jnp.asarray(logits)
  t = jnp.asarray(targets, logits.dtype)
  if t.shape != logits.shape:
    raise ValueError(f"targets shape {t.shape} != logits shape {logits.shape}")
  loss = -(t * jax.nn.log_sigmoid(logits) + (1 - t) * jax.nn.log_sigmoid(-logits))
  return reduce_loss(loss, weights, reduction=reduction, avg_factor=avg_factor)


def _softmax_ce(logits, labels):
  """Per-row softmax cross-entropy ``(..., K), (...) -> (...)``; labels outside 0..K-1 give 0."""
  num = logits.shape[-1]
  valid = (labels >= 0) & (labels < num)
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, ce, 0.), valid, safe


def cross_entropy(logits, labels, weights=None, *, class_weight=None, reduction="mean",
                  avg_factor=None):
  """Softmax cross-entropy over the last axis, per-class weights as ``F.cross_entropy``.

  Element i's loss is ``class_weight[labels_i] * ce_i * weights_i`` (0 for negative labels).
  reduction='mean' without ``avg_factor`` is PyTorch's weighted mean,
  ``sum_i(w_i ce_i) / sum_i(w_i)`` with ``w_i = class_weight[labels_i] * weights_i`` over
  non-ignored elements (0 when that sum is 0).  DETR: ``class_weight`` 1 for the C classes and
  0.1 for the no-object class C; mmdetection passes ``avg_factor = num_pos + 0.1 * num_neg``,
  which is the same number.

  Args:
    logits: (..., K) float.  labels: (...) int.  weights: (...) per-element weights.
    class_weight: (K,) or None.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be int of shape {logits.shape[:-1]}, got "
                     f"{labels.shape} {labels.dtype}")
  ce, valid, safe = _softmax_ce(logits, labels)
  w = valid.astype(logits.dtype)
  if class_weight is not None:
    class_weight = jnp.asarray(class_weight, logits.dtype)
    if class_weight.shape != logits.shape[-1:]:
      raise ValueError(f"class_weight must have shape {logits.shape[-1:]}, got "
                       f"{class_weight.shape}")
    w = w * class_weight[safe]
  if weights is not None:
    weights = jnp.asarray(weights, logits.dtype)
    if weights.shape != labels.shape:
      raise ValueError(f"weights shape {weights.shape} != labels shape {labels.shape}")
    w = w * weights
  if reduction == "mean" and avg_factor is None:
    den = w.sum()
    return (w * ce).sum() / jnp.where(den > 0, den, 1.)
  return reduce_loss(w * ce, None, reduction=reduction, avg_factor=avg_factor)


def ssd_hard_negative_ce(logits, labels, weights=None, *, neg_pos_ratio=3, avg_factor=None):
  """SSD's classification loss with hard negative mining for ONE image (vmap for a batch).

  As mmdetection's ``SSDHead.loss_by_feat_single``: the softmax CE of every positive plus the
  CE of the ``min(neg_pos_ratio * num_pos, num_neg)`` negatives of largest CE.  Fixed-size:
  the negatives are ranked by a full argsort and kept where rank < that count.

  Args:
    logits: (A, C + 1) float, background logit last.
    labels: (A,) int: 0..C-1 positive, C or -1 background (negative).
    weights: (A,) label weights (mmdetection's ``label_weights``; 0 for ignored priors).
    avg_factor: the divisor.  mmdetection divides every image's sum by the number of positives
      in the whole batch (no eps) and adds the images' results; so either pass that count
      here, or pass None and divide the vmapped sum yourself.  Guard against 0 positives
      (e.g. ``max(num_pos, 1)``): mmdetection's 0 / 0 would be NaN.
  Returns:
    scalar: (sum of positive CE + sum of mined negative CE) [/ avg_factor].
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"expected logits (A, C + 1) and labels (A,), got {logits.shape} and "
                     f"{labels.shape}; vmap over images")
  num_classes = logits.shape[-1] - 1
  is_pos = (labels >= 0) & (labels < num_classes)
  ce, _, _ = _softmax_ce(logits, jnp.where(is_pos, labels, num_classes))
  if weights is not None:
    ce = ce * jnp.asarray(weights, ce.dtype)
  is_neg = ~is_pos
  num_neg = neg_pos_ratio * is_pos.sum()  # capped at the number of negatives by `is_neg &`
  key = jnp.where(is_neg, jax.lax.stop_gradient(ce), -jnp.inf)
  order = jnp.argsort(-key)  # negatives by decreasing CE, then the positives
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  keep = is_pos | (is_neg & (rank < num_neg))
  total = jnp.where(keep, ce, 0.).sum()
  return total if avg_factor is None else total / avg_factor


def l1_loss(pred, target, weights=None, *, reduction="mean", avg_factor=None):
  """Element-wise ``|pred - target|`` (mmdetection's ``L1Loss``)."""
  pred, target = _same_shape(pred, target)
  return reduce_loss(jnp.abs(pred - target), weights, reduction=reduction,
                     avg_factor=avg_factor)


def smooth_l1_loss(pred, target, weights=None, *, beta=1.0, reduction="mean", avg_factor=None):
  """Element-wise Huber-style loss: ``0.5 d^2 / beta`` if ``d < beta`` else ``d - 0.5 beta``."""
  if not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  pred, target = _same_shape(pred, target)
  diff = jnp.abs(pred - target)
  loss = jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
  return reduce_loss(loss, weights, reduction=reduction, avg_factor=avg_factor)


def iou_loss(pred, target, weights=None, *, mode="log", eps=1e-6, reduction="mean",
             avg_factor=None):
  """mmdetection's ``IoULoss`` on aligned boxes ``(..., 4)`` xyxy -> per box ``(...)``.

  iou = max(IoU(pred, target), eps); mode 'log': -log(iou) (FCOS), 'linear': 1 - iou,
  'square': 1 - iou^2.  ``weights`` (...) per box, or (..., 4) averaged over the last axis.
  Zero-area boxes give IoU 0 -> -log(eps), finite with finite gradients.
  """
  if mode not in ("log", "linear", "square"):
    raise ValueError(f"mode must be 'log', 'linear' or 'square', got {mode!r}")
  pred, target = _same_shape(pred, target)
  iou = jnp.maximum(box_iou_aligned(pred, target), eps)
  loss = {"log": lambda: -jnp.log(iou), "linear": lambda: 1 - iou,
          "square": lambda: 1 - iou**2}[mode]()
  return reduce_loss(loss, _box_weights(weights, pred), reduction=reduction,
                     avg_factor=avg_factor)


def giou_loss(pred, target, weights=None, *, eps=1e-7, reduction="mean", avg_factor=None):
  """mmdetection's ``GIoULoss``: ``1 - GIoU(pred, target)`` per box, union / enclosing area
  clamped to ``eps`` (1e-7).  Shapes and weights as ``iou_loss``.  (ATSS: weights = centerness
  targets, avg_factor = their sum.)"""
  pred, target = _same_shape(pred, target)
  loss = 1 - generalized_box_iou_aligned(pred, target, eps=eps)
  return reduce_loss(loss, _box_weights(weights, pred), reduction=reduction,
                     avg_factor=avg_factor)


def centerness_target(ltrb):
  """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.

  ``ltrb (..., 4)``: distances from a prior's point to the left, top, right, bottom sides of
  its gt (ATSS: from the anchor centre).  Returns (...); 0 where any distance is <= 0 (only
  positives, which lie inside their gt, have a meaningful target), with finite gradients.
  """
  ltrb = jnp.asarray(ltrb)
  left, top, right, bottom = jnp.moveaxis(ltrb, -1, 0)
  ok = ltrb.min(axis=-1) > 0
  lr_max = jnp.where(ok, jnp.maximum(left, right), 1.)
  tb_max = jnp.where(ok, jnp.maximum(top, bottom), 1.)
  ratio = (jnp.minimum(left, right) / lr_max) * (jnp.minimum(top, bottom) / tb_max)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ratio, 1.)), 0.)


def _same_shape(pred, target):
  pred = jnp.asarray(pred)
  target = jnp.asarray(target, pred.dtype)
  if pred.shape != target.shape:
    raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
  return pred, target


def _box_weights(weights, boxes):
  if weights is None:
    return None
  weights = jnp.asarray(weights)
  if weights.shape == boxes.shape:
    return weights.mean(axis=-1)
  if weights.shape != boxes.shape[:-1]:
    raise ValueError(f"weights must have shape {boxes.shape[:-1]} or {boxes.shape}, got "
                     f"{weights.shape}")
  return weights
