"""COCO evaluation against pycocotools called directly, result conversion, results table."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxdet.data.sources import DataError
from jaxdet.evaluation import (TABLE_COLUMNS, coco_evaluate, format_results_table,
                               predictions_to_coco_results)

CATS = [dict(id=2, name='two'), dict(id=9, name='nine'), dict(id=5, name='five')]


def make_gt():
  """4 images of 300x300; boxes of every COCO size (small < 32^2 < medium < 96^2 < large)."""
  rng = np.random.default_rng(0)
  images = [dict(id=100 + i, file_name=f'{i}.png', width=300, height=300) for i in range(4)]
  anns = []
  for img in images:
    for side in (10, 20, 50, 80, 120, 150):
      x, y = rng.uniform(0, 300 - side, 2)
      anns.append(dict(id=len(anns) + 1, image_id=img['id'], category_id=int(rng.choice([2, 9])),
                       bbox=[float(x), float(y), float(side), float(side) * 0.8],
                       area=float(side * side * 0.8), iscrowd=0))
  anns.append(dict(id=len(anns) + 1, image_id=100, category_id=2, bbox=[0, 0, 60, 60],
                   area=3600.0, iscrowd=1))
  return dict(images=images, annotations=anns, categories=CATS)


def quiet_coco(dataset):
  coco = COCO()
  coco.dataset = copy.deepcopy(dataset)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def perfect(gt):
  return [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=list(a['bbox']),
               score=0.5 + 0.01 * k) for k, a in enumerate(gt['annotations']) if not a['iscrowd']]


def shifted(gt, seed=1):
  """Jittered boxes, a few wrong classes and false positives (< 100 per image)."""
  rng = np.random.default_rng(seed)
  dets = []
  for a in gt['annotations']:
    x, y, w, h = a['bbox']
    dx, dy = rng.normal(0, 0.15, 2) * (w, h)
    cat = a['category_id'] if rng.uniform() < 0.85 else 9 if a['category_id'] == 2 else 2
    dets.append(dict(image_id=a['image_id'], category_id=cat, bbox=[x + dx, y + dy, w, h],
                     score=float(rng.uniform())))
  for img in gt['images']:
    for _ in range(5):
      x, y = rng.uniform(0, 250, 2)
      dets.append(dict(image_id=img['id'], category_id=int(rng.choice([2, 9, 5])),
                       bbox=[x, y, 40.0, 30.0], score=float(rng.uniform(0, 0.5))))
  return dets


def pycocotools_direct(gt, dets, cat_ids=None):
  """pycocotools' own recipe with its defaults (maxDets 1, 10, 100)."""
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = quiet_coco(gt)
    coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
    e = COCOeval(coco_gt, coco_dt, 'bbox')
    if cat_ids is not None:
      e.params.catIds = cat_ids
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e.stats


def test_perfect_detections_give_one():
  gt = make_gt()
  m = coco_evaluate(perfect(gt), quiet_coco(gt), verbose=False)
  for key in ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl'):
    assert m[key] == pytest.approx(1.0), key
  assert m['per_class']['two'] == pytest.approx(1.0)
  assert m['per_class']['nine'] == pytest.approx(1.0)
  assert math.isnan(m['per_class']['five'])   # no ground truth of that class


def test_shifted_boxes_match_pycocotools_called_directly():
  gt = make_gt()
  dets = shifted(gt)
  m = coco_evaluate(dets, quiet_coco(gt), verbose=False)
  stats = pycocotools_direct(gt, dets)
  assert 0.1 < stats[0] < 0.9   # a non-trivial case
  for i, key in enumerate(('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl')):
    assert m[key] == pytest.approx(stats[i], abs=1e-12), key
  # Per class: pycocotools restricted to that one category.
  for cat in CATS:
    direct = pycocotools_direct(gt, dets, cat_ids=[cat['id']])[0]
    if direct < 0:
      assert math.isnan(m['per_class'][cat['name']])
    else:
      assert m['per_class'][cat['name']] == pytest.approx(direct, abs=1e-12)


def test_input_is_not_mutated_and_ann_file_path_works(tmp_path):
  gt = make_gt()
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(gt))
  dets = shifted(gt)
  before = copy.deepcopy(dets)
  a = coco_evaluate(dets, str(path), verbose=False)
  assert dets == before
  b = coco_evaluate(dets, quiet_coco(gt), verbose=False)
  assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)   # NaN-aware


def test_empty_detections_give_zeros():
  gt = make_gt()
  m = coco_evaluate([], quiet_coco(gt), verbose=False)
  assert all(m[k] == 0.0 for k in ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl'))
  assert m['per_class'] == {'two': 0.0, 'nine': 0.0, 'five': 0.0}


def test_images_without_detections_count_as_misses():
  gt = make_gt()
  dets = [d for d in perfect(gt) if d['image_id'] != 100]   # one image of 4 left out
  m = coco_evaluate(dets, quiet_coco(gt), verbose=False)
  assert m['mAP'] == pytest.approx(pycocotools_direct(gt, dets)[0], abs=1e-12)
  assert m['mAP'] < 0.9
  only = coco_evaluate(dets, quiet_coco(gt), img_ids=[101, 102, 103], verbose=False)
  assert only['mAP'] == pytest.approx(1.0)


def test_verbose_prints_summary_then_per_class_table(capsys):
  gt = make_gt()
  coco_evaluate(shifted(gt), quiet_coco(gt), verbose=True)
  out = capsys.readouterr().out
  summary = out.index('Average Precision  (AP) @[ IoU=0.50:0.95')
  table = out.index('| category | mAP | AP50 | AP75 | APs | APm | APl |')
  assert summary < table
  assert '| nine |' in out and '| five | nan |' in out


@pytest.mark.parametrize('change, needle', [
    (dict(image_id=12345), 'image_id 12345'),
    (dict(category_id=0), 'category_id 0'),
    (dict(bbox=[1, 2, 3]), 'bbox'),
])
def test_bad_detections(change, needle):
  gt = make_gt()
  dets = perfect(gt)
  dets[0] = dict(dets[0], **change)
  with pytest.raises(DataError) as e:
    coco_evaluate(dets, quiet_coco(gt), verbose=False)
  assert needle in str(e.value) and '\n' not in str(e.value)


def test_predictions_to_coco_results():
  boxes = np.array([[[1, 2, 11, 22], [5, 5, 6, 7], [0, 0, 1, 1]],
                    [[3, 3, 4, 4], [10, 20, 30, 60], [0, 0, 0, 0]],
                    [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]]], np.float32)
  scores = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.3, 0.2, 0.1]], np.float32)
  labels = np.array([[0, 2, 1], [1, 1, 0], [0, 0, 0]])
  valid = np.array([[True, True, False], [False, True, False], [True, True, True]])
  image_mask = np.array([True, True, False])   # a padding image in a partial last batch
  out = predictions_to_coco_results(boxes, scores, labels, valid, [7, 3, -1], [2, 9, 5],
                                    image_mask=image_mask)
  assert out == [
      dict(image_id=7, category_id=2, bbox=[1.0, 2.0, 10.0, 20.0], score=pytest.approx(0.9)),
      dict(image_id=7, category_id=5, bbox=[5.0, 5.0, 1.0, 2.0], score=pytest.approx(0.8)),
      dict(image_id=3, category_id=9, bbox=[10.0, 20.0, 20.0, 40.0], score=pytest.approx(0.5)),
  ]
  assert all(type(v) in (int, float, list) for d in out for v in d.values())
  json.dumps(out)   # plain Python types
  with pytest.raises(ValueError, match='labels'):
    predictions_to_coco_results(boxes, scores, labels + 2, valid, [7, 3, 1], [2, 9, 5])
  with pytest.raises(ValueError, match='scores'):
    predictions_to_coco_results(boxes, scores[:, :2], labels, valid, [7, 3, 1], [2, 9, 5])


def test_format_results_table():
  rows = [dict({'Network': 'ATSS', 'Dataset': 'COCO', 'Backbone': 'R-50', 'style': 'pytorch',
                'Lr schd': '1x', 'Mem': 3.714, 'img/s': 21.06},
               mAP=0.3942, AP50=0.5761, AP75=0.4263, APs=0.2311, APm=0.4352, APl=-1.0,
               per_class={'a': 0.1}),
          {'Network': 'SSD300'}]
  lines = format_results_table(rows).splitlines()
  assert lines[0] == '| ' + ' | '.join(TABLE_COLUMNS) + ' |'
  assert lines[0] == ('| Network | Dataset | Backbone | style | Lr schd | Mem | mAP | AP50 | AP75 '
                      '| APs | APm | APl | img/s |')
  assert lines[1].count('---') == 13
  assert lines[2] == ('| ATSS | COCO | R-50 | pytorch | 1x | 3.7 | 39.4 | 57.6 | 42.6 | 23.1 '
                      '| 43.5 | - | 21.1 |')
  assert lines[3] == '| SSD300 |' + ' - |' * 12
