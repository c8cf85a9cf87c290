"""Hungarian matching (DETR): a jit- and vmap-able minimum-cost bipartite matching.

``hungarian_match`` solves the rectangular assignment problem over the *valid* columns with
``optax.assignment.hungarian_algorithm``: every row or every valid column (whichever are
fewer) is matched, each at most once, with the least total cost.

Padded columns. They are given one constant cost ``big`` (below) and the full N x M problem is
solved; matches that land on a padded column are then dropped. This gives an optimum over the
valid columns because ``big`` is larger than every valid cost (``big - c >= 1 + |c_max|``):

* An optimal full matching never has a row on a padded column while a valid column is free:
  moving that row to the free valid column ``c`` changes the total by ``c - big < 0``. Counting
  rows then shows that it uses exactly ``k = min(N, number of valid columns)`` valid columns
  (if N <= valid, a row on a padded column would leave a valid column free; if N > valid, a free
  valid column would leave a row on a padded column or, when M <= N, is impossible since all
  M columns are matched).
* So its total is (valid part) + (a fixed number of padded matches) * ``big``, and any
  k-matching of the valid columns extends to a full matching with the same padded count; hence
  its valid part is a minimum-cost k-matching of the valid columns.

Precision: ``big = max(2 * c_max, 0) + 1`` stays within a factor ~2 of the largest valid cost,
so it costs the float32 solver no precision, while its margin over every valid cost is at
least ``1 + |c_max|``, far above float32 rounding of sums of such costs. Costs must be finite
(padded columns may hold anything, NaN included).
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
    col_mask = jnp.ones((num_cols,), bool)
  col_mask = jnp.asarray(col_mask, bool)

  valid_max = jnp.max(jnp.where(col_mask[None, :], cost, -jnp.inf))  # -inf when none valid
  big = jnp.maximum(2 * valid_max, 0.) + 1.
  rows, cols = hungarian_algorithm(jnp.where(col_mask[None, :], cost, big))

  row_to_col = jnp.full((num_rows,), -1, jnp.int32).at[rows].set(cols.astype(jnp.int32))
  row_to_col = jnp.where(col_mask[jnp.maximum(row_to_col, 0)], row_to_col, -1)
  col_to_row = jnp.full((num_cols,), -1, jnp.int32).at[
      jnp.where(row_to_col >= 0, row_to_col, num_cols)].set(
          jnp.arange(num_rows, dtype=jnp.int32), mode='drop')
  return row_to_col, col_to_row


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
