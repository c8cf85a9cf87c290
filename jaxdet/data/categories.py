"""Class names and category ids of a model's labels, for inference without the dataset.

`jaxdet.inference` names a detector's labels from, in order:
  1. the list the training run saved in its checkpoints (`extra['classes']`: the names and
     category ids of the dataset it trained on; written by `jaxdet.train` since issue 7);
  2. `config_categories(config)`: the config's dataset, read without touching any image:
     shapes -> its 5 classes (ids label + 1); coco -> the categories of `data.val.ann_file`
     (else `data.train.ann_file`) when that file exists, sorted by id as `CocoSource` does;
     otherwise, for 80 classes, COCO's 80 names and ids (also TFDS `coco/2017`);
  3. otherwise 'class_0', 'class_1', ... with ids label + 1.
"""
import os

from jaxdet.data.sources.coco import COCO80_IDS, read_coco_json
from jaxdet.data.sources.records import DataError

# COCO 2017's 80 category names in label order (ids `COCO80_IDS`), as mmdetection's CocoDataset.
COCO80_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')
assert len(COCO80_NAMES) == len(COCO80_IDS) == 80


def _coco_file_categories(ann_file):
  data = read_coco_json(ann_file)
  cats = sorted(data.get('categories', []), key=lambda c: c['id'])
  return [str(c['name']) for c in cats], [int(c['id']) for c in cats]


def config_categories(config):
  """`(class_names, cat_ids)` for `config.model.num_classes` labels from `config.data` (see the
  module docstring, step 2 and 3); never reads an image or generates a dataset."""
  k = int(config.model.num_classes)
  data = config.data
  source = data.get('source', '')
  found = None
  if source == 'shapes':
    from jaxdet.data.shapes import CLASSES  # pylint: disable=import-outside-toplevel
    found = list(CLASSES), list(range(1, len(CLASSES) + 1))
  elif source == 'coco':
    for split in ('val', 'train'):
      ann_file = (data.get(split) or {}).get('ann_file', '')
      if ann_file and os.path.isfile(ann_file):
        try:
          found = _coco_file_categories(ann_file)
        except (DataError, KeyError, TypeError):
          found = None
        break
  if (found is None or len(found[0]) != k) and k == 80 and source in ('coco', 'tfds'):
    found = list(COCO80_NAMES), list(COCO80_IDS)
  if found is None or len(found[0]) != k:
    found = [f'class_{i}' for i in range(k)], list(range(1, k + 1))
  return found
