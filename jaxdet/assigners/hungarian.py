"""Hungarian matching (DETR): a jit- and vmap-able minimum-cost bipartite matching.

``hungarian_match`` solves the rectangular assignment problem over the *valid* columns with
``optax.assignment.hungarian_algorithm``: ``k = min(N, number of valid columns)`` pairs, each row
and each column used at most once, with the least total cost.

Padded columns (DETR: padded ground truth). With a ``col_mask`` the solver gets, instead of the
(N, M) cost, an (M, N + M) problem whose rows are the columns ("gts") and whose columns are the
N rows ("queries") followed by M dummies, one per gt:

* valid gt g:  cost[q, g] for query q;  ``big`` for its own dummy;  ``2 * big`` elsewhere;
* padded gt g: ``2 * big`` for every query; 0 for its own dummy; ``2 * big`` elsewhere;

with ``big = max(2 * c_max, 0) + 1`` larger than every valid cost ``c`` (by ``1 + |c_max|``).
Why its optimum is optimal over the valid columns: in any matching, a gt that sits on a
``2 * big`` entry can move to its own dummy (first moving away, in the same way, a gt sitting on
that dummy, which pays ``2 * big`` there too), and each such move lowers the cost. So an optimum
has every padded gt on its own dummy and every valid gt on a query or its own dummy. Then if
fewer than k valid gts are on queries, some query is free while a valid gt pays ``big`` on its
dummy: moving it changes the cost by ``c - big < 0``. So an optimum puts exactly k valid gts on
queries, pays ``big`` for each of the others, a constant, and its queries part is a minimum-cost
k-matching of the valid columns. Giving every padded gt its own cheap partner (rather than one
constant cost for all of them, which is also optimal) keeps the solver from long searches among
equal costs: with few real gts per image, as in DETR, it is several times faster. It is slower
when there are more valid columns than rows.

Precision: all entries stay within a factor ~4 of the largest valid cost, so the float32 solver
loses nothing, and the margins (``big - c >= 1 + |c_max|``, ``big``) are far above float32
rounding. Costs must be finite where ``col_mask`` is True (padded columns may hold anything).
"""
import jax
import jax.numpy as jnp
import numpy as np
from optax.assignment import hungarian_algorithm

from jaxdet.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


def hungarian_match(cost, col_mask=None):
  """Minimum-cost matching of the rows of ``cost`` to its valid columns.

  Args:
    cost: (N, M) float32, finite where ``col_mask`` is True (DETR: N queries x M padded gts).
    col_mask: optional (M,) bool, True for real columns; others are never matched.

  Returns:
    ``(row_to_col, col_to_row)``:
      row_to_col: (N,) int32, the column matched to each row, -1 for none (DETR: per query, the
        gt it predicts, -1 for "no object").
      col_to_row: (M,) int32, the row matched to each column, -1 for none (padded columns and,
        when N < number of valid columns, the valid columns left over).
    ``min(N, valid columns)`` pairs are matched; their total cost is the minimum.
  """
  if np.ndim(cost) != 2:
    raise ValueError(f'cost must be (N, M), got shape {np.shape(cost)}')
  num_rows, num_cols = np.shape(cost)
  if col_mask is not None and np.shape(col_mask) != (num_cols,):
    raise ValueError(f'col_mask must be ({num_cols},), got shape {np.shape(col_mask)}')
  if num_rows == 0 or num_cols == 0:
    return jnp.full((num_rows,), -1, jnp.int32), jnp.full((num_cols,), -1, jnp.int32)
  cost = jnp.asarray(cost, jnp.float32)
  if col_mask is None:
    rows, cols = hungarian_algorithm(cost)
    col_to_row = jnp.full((num_cols,), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
  else:
    col_to_row = _masked_col_to_row(cost, jnp.asarray(col_mask, bool))
  row_to_col = jnp.full((num_rows,), -1, jnp.int32).at[
      jnp.where(col_to_row >= 0, col_to_row, num_rows)].set(
          jnp.arange(num_cols, dtype=jnp.int32), mode='drop')
  return row_to_col, col_to_row


def _masked_col_to_row(cost, col_mask):
  """The (M, N + M) problem of the module docstring -> (M,) row of each valid column, or -1."""
  num_rows, num_cols = cost.shape
  valid_max = jnp.max(jnp.where(col_mask[None, :], cost, -jnp.inf))  # -inf when none valid
  big = jnp.maximum(2 * valid_max, 0.) + 1.
  to_queries = jnp.where(col_mask[:, None], cost.T, 2 * big)  # (M, N)
  own_dummy = jnp.where(col_mask, big, 0.)
  to_dummies = jnp.where(jnp.eye(num_cols, dtype=bool), own_dummy[:, None], 2 * big)  # (M, M)
  gts, partners = hungarian_algorithm(jnp.concatenate([to_queries, to_dummies], axis=1))
  col_to_row = jnp.full((num_cols,), -1, jnp.int32).at[gts].set(partners.astype(jnp.int32))
  return jnp.where(col_mask & (col_to_row < num_rows), col_to_row, -1)


def detr_match_cost(pred_logits, pred_boxes, gt_labels, gt_boxes, *, class_weight=1.,
                    bbox_weight=5., giou_weight=2.):
  """DETR's matching cost (facebookresearch/detr ``HungarianMatcher``) for one image.

  ``class_weight * -softmax(pred_logits)[q, gt_labels[g]]
  + bbox_weight * ||pred_boxes[q] - gt_boxes[g]||_1
  + giou_weight * -GIoU(xyxy(pred_boxes[q]), xyxy(gt_boxes[g]))``

  Args:
    pred_logits: (Q, C + 1) float32 class logits (the last class is "no object").
    pred_boxes: (Q, 4) float32, (cx, cy, w, h) normalised by the image size.
    gt_labels: (G,) int32 in [0, C).
    gt_boxes: (G, 4) float32, (cx, cy, w, h) normalised by the image size.

  Returns:
    (Q, G) float32 cost. Columns of padded gts hold garbage: pass ``col_mask`` to
    ``hungarian_match``.
  """
  if np.ndim(pred_logits) != 2:
    raise ValueError(f'pred_logits must be (Q, C + 1), got shape {np.shape(pred_logits)}')
  num_queries = np.shape(pred_logits)[0]
  if np.shape(pred_boxes) != (num_queries, 4):
    raise ValueError(f'pred_boxes must be ({num_queries}, 4), got shape {np.shape(pred_boxes)}')
  if np.ndim(gt_boxes) != 2 or np.shape(gt_boxes)[-1] != 4:
    raise ValueError(f'gt_boxes must be (G, 4), got shape {np.shape(gt_boxes)}')
  if np.shape(gt_labels) != (np.shape(gt_boxes)[0],):
    raise ValueError(f'gt_labels must be ({np.shape(gt_boxes)[0]},), got shape '
                     f'{np.shape(gt_labels)}')
  prob = jax.nn.softmax(jnp.asarray(pred_logits, jnp.float32), axis=-1)
  pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  cost_class = -jnp.take(prob, jnp.asarray(gt_labels, jnp.int32), axis=1, mode='clip')
  cost_bbox = jnp.abs(pred_boxes[:, None, :] - gt_boxes[None, :, :]).sum(-1)
  cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
  return bbox_weight * cost_bbox + class_weight * cost_class + giou_weight * cost_giou
