"""COCO box evaluation with pycocotools, as mmdetection's CocoMetric does it.

Detections are COCO result dicts: ``dict(image_id=int, category_id=int, bbox=[x, y, w, h],
score=float)`` in *original* image pixels with the dataset's *original* ids
(``predictions_to_coco_results`` makes them from a model's fixed-size batched output).

mmdetection's settings: ``maxDets = (100, 300, 1000)`` (AP is read at the last, which equals
the standard 100 when a model keeps at most 100 boxes per image), all ground-truth images are
evaluated (an image without detections counts its objects as missed), and per-class AP is the
mean of the precision array over IoUs and recalls where it is defined (NaN without ground
truth). pycocotools reports -1 for an area range without ground truth; that is kept.
"""
import contextlib
import io
import json
import math
import os

import jax
import numpy as np

from jaxdet.data.sources import DataError, coco_from_dict, read_coco_json

METRICS = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
TABLE_COLUMNS = ('Network', 'Dataset', 'Backbone', 'style', 'Lr schd', 'Mem', 'mAP', 'AP50',
                 'AP75', 'APs', 'APm', 'APl', 'img/s')


def _load_gt(ann_file_or_coco):
  from pycocotools.coco import COCO
  if isinstance(ann_file_or_coco, COCO):
    return ann_file_or_coco
  return coco_from_dict(read_coco_json(str(ann_file_or_coco)))


def _check_detections(detections, gt):
  """Validated copies of ``detections`` (pycocotools' loadRes mutates its input).

  Raises ``DataError`` for a detection that does not fit the ground truth.
  """
  img_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
  checked = []
  for d in detections:
    try:
      x, y, w, h = (float(v) for v in d['bbox'])
      det = dict(image_id=int(d['image_id']), category_id=int(d['category_id']),
                 bbox=[x, y, w, h], score=float(d['score']))
    except (KeyError, TypeError, ValueError):
      raise DataError(f'detection {str(d)[:120]} is not a COCO result dict with '
                            f'image_id, category_id, bbox=[x, y, w, h] and score') from None
    if det['image_id'] not in img_ids:
      raise DataError(f'detection for image_id {det["image_id"]}, which is not in the '
                            f'ground truth ({len(img_ids)} images)')
    if det['category_id'] not in cat_ids:
      raise DataError(f'detection with category_id {det["category_id"]}, not one of the '
                            f'ground-truth category ids {sorted(cat_ids)} (labels must be '
                            f'mapped back with source.cat_ids)')
    checked.append(det)
  return checked


def _mean_precision(precision):
  precision = precision[precision > -1]
  return float(np.mean(precision)) if precision.size else float('nan')


def coco_evaluate(detections, ann_file_or_coco, *, img_ids=None, max_dets=(100, 300, 1000),
                  verbose=True):
  """Box AP of ``detections`` against a COCO ground truth.

  Args:
    detections: list of COCO result dicts (see the module docstring); may be empty.
    ann_file_or_coco: path of a COCO annotation file or a pycocotools ``COCO``.
    img_ids: evaluate only these image ids (default: every ground-truth image).
    max_dets: pycocotools ``params.maxDets``; AP uses the last.
    verbose: print pycocotools' summary and then the per-class table.

  Returns:
    dict(mAP, AP50, AP75, APs, APm, APl: floats in [0, 1] (-1: no ground truth in that
    area range), per_class: {class name: AP}). No detections at all gives 0 (not a crash).
  """
  from pycocotools.cocoeval import COCOeval
  gt = _load_gt(ann_file_or_coco)
  dets = _check_detections(detections, gt)
  quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  cats = gt.loadCats(gt.getCatIds())
  if not dets:
    if verbose:
      print('coco_evaluate: no detections; every metric is 0')
    return dict({k: 0.0 for k in METRICS}, per_class={c['name']: 0.0 for c in cats})
  with quiet:
    dt = gt.loadRes(dets)
    evaluator = COCOeval(gt, dt, 'bbox')
    evaluator.params.maxDets = list(max_dets)
    if img_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in img_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  precision = evaluator.eval['precision']   # (iou, recall, class, area range, max dets)
  rows = []   # the class axis follows params.catIds (sorted ids), not the file's order
  for k, cat in enumerate(gt.loadCats(evaluator.params.catIds)):
    rows.append([cat['name']] + [_mean_precision(p) for p in (
        precision[:, :, k, 0, -1], precision[0, :, k, 0, -1], precision[5, :, k, 0, -1],
        precision[:, :, k, 1, -1], precision[:, :, k, 2, -1], precision[:, :, k, 3, -1])])
  if verbose:
    print(format_per_class_table(rows))
  result = {name: float(evaluator.stats[i]) for i, name in enumerate(METRICS)}
  result['per_class'] = {row[0]: row[1] for row in rows}
  return result


def format_per_class_table(rows):
  """Markdown table of ``[name, mAP, AP50, AP75, APs, APm, APl]`` rows (3 decimals)."""
  lines = ['| category | ' + ' | '.join(METRICS) + ' |', '|---' * (len(METRICS) + 1) + '|']
  for name, *values in rows:
    cells = ['nan' if math.isnan(v) else f'{v:.3f}' for v in values]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def predictions_to_coco_results(boxes, scores, labels, valid, image_ids, cat_ids, *,
                                image_mask=None):
  """Fixed-size batched predictions -> list of COCO result dicts with original ids.

  Args:
    boxes: (B, N, 4) xyxy in original image pixels.
    scores: (B, N).
    labels: (B, N) ints in 0..K-1.
    valid: (B, N) bool; rows that are False are padding and dropped.
    image_ids: (B,) original image ids.
    cat_ids: sequence of K original category ids (``source.cat_ids``): label -> id.
    image_mask: optional (B,) bool; False marks padding images (a partial last batch).

  Returns:
    list of dict(image_id, category_id, bbox=[x, y, w, h], score), image by image.
  """
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  valid = np.asarray(valid, bool)
  image_ids = np.asarray(image_ids).reshape(-1)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be (B, N, 4), got {boxes.shape}')
  b, n = boxes.shape[:2]
  for name, array in (('scores', scores), ('labels', labels), ('valid', valid)):
    if array.shape != (b, n):
      raise ValueError(f'{name} must be {(b, n)} like boxes, got {array.shape}')
  if image_ids.shape != (b,):
    raise ValueError(f'image_ids must be ({b},), got {image_ids.shape}')
  if image_mask is not None:
    image_mask = np.asarray(image_mask, bool).reshape(-1)
    if image_mask.shape != (b,):
      raise ValueError(f'image_mask must be ({b},), got {image_mask.shape}')
    valid = valid & image_mask[:, None]
  cat_ids = np.asarray(cat_ids)
  used = labels[valid]
  if used.size and (used.min() < 0 or used.max() >= len(cat_ids)):
    raise ValueError(f'labels must be in 0..{len(cat_ids) - 1} (len(cat_ids)), got '
                     f'{used.min()}..{used.max()}')
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
  results = []
  for i, j in zip(*np.nonzero(valid)):
    results.append(dict(image_id=int(image_ids[i]), category_id=int(cat_ids[labels[i, j]]),
                        bbox=[float(v) for v in xywh[i, j]], score=float(scores[i, j])))
  return results


def _cell(column, value):
  if value is None or value == '' or (isinstance(value, float) and math.isnan(value)):
    return '-'
  if column in METRICS:
    return '-' if value < 0 else f'{100 * value:.1f}'   # AP as mmdetection's tables: x100
  if column in ('Mem', 'img/s') and isinstance(value, (int, float, np.number)):
    return f'{value:.1f}'
  return str(value)


def format_results_table(rows):
  """A markdown table in mmdetection's README layout.

  Each row is a dict keyed by ``TABLE_COLUMNS`` (Network, Dataset, Backbone, style,
  Lr schd, Mem (GB), mAP, AP50, AP75, APs, APm, APl (fractions, shown x100), img/s);
  ``coco_evaluate``'s result can be merged in as is. Missing values show as '-'.
  """
  lines = ['| ' + ' | '.join(TABLE_COLUMNS) + ' |', '|' + '---|' * len(TABLE_COLUMNS)]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(c, row.get(c)) for c in TABLE_COLUMNS) + ' |')
  return '\n'.join(lines)


DEFAULT_COMPILATION_CACHE = '~/.cache/jaxdet/xla'


def enable_compilation_cache(directory=None):
  """Turns on JAX's persistent compilation cache, so that a program compiled once (e.g. the
  predict step of one test image shape) is read from disk by every later process: a second
  evaluation or inference run compiles nothing (it still traces each program, ~1-15 s).

  `directory`: None -> `$JAXDET_COMPILATION_CACHE`, else `~/.cache/jaxdet/xla`; '' (or 'off')
  leaves the cache off. Nothing changes when JAX's own `jax_compilation_cache_dir` is already
  set (e.g. by `$JAX_COMPILATION_CACHE_DIR`). Every program is cached, however fast it
  compiled; delete the folder to reclaim its space. Returns the directory in use (or None).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if directory is None:
    directory = os.environ.get('JAXDET_COMPILATION_CACHE', DEFAULT_COMPILATION_CACHE)
  if not directory or directory == 'off':
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return directory


def evaluate_loader(p_predict, state, eval_loader, source, *, work_dir=None, tag=None):
  """COCO box AP of a model on every image of `source`, batch by batch from `eval_loader`.

  `p_predict(state, batch)` is the pmapped `jaxdet.engine.steps.predict_step` (Predictions with
  leading (devices, images) axes); padding images (image_valid False) are dropped; with several
  processes every process gathers all detections. With `work_dir` and `tag` process 0 also writes
  `work_dir/detections_{tag}.json` (atomically). Returns `coco_evaluate`'s metrics.
  Turns on the persistent compilation cache first (`enable_compilation_cache`): with exact
  test padding every image shape of `eval_loader.shapes` is one program.
  """
  enable_compilation_cache()
  results = []
  flat = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:])
  for batch in eval_loader:
    pred = jax.device_get(p_predict(state, batch))
    ids, mask = batch['image_id'], batch['image_valid']
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      pred, ids, mask = multihost_utils.process_allgather((pred, ids, mask), tiled=True)
    results += predictions_to_coco_results(
        flat(pred.boxes), flat(pred.scores), flat(pred.labels), flat(pred.valid), flat(ids),
        source.cat_ids, image_mask=flat(mask))
  if work_dir and tag and jax.process_index() == 0:
    write_json_atomic(os.path.join(work_dir, f'detections_{tag}.json'), results)
  return coco_evaluate(results, source.coco, img_ids=list(source.image_ids))


def write_json_atomic(path, obj):
  """Writes `obj` as JSON to `path` through a temporary file (never half-written)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)
