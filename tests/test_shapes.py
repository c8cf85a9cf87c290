"""The built-in shapes dataset: determinism, tight boxes, size mix, CLI and cache."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdet.data import shapes
from jaxdet.data.sources import CocoSource, build_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_seed_same_image_different_seed_different():
  a = shapes.sample(3, 'train', 5, 64)
  b = shapes.sample(3, 'train', 5, 64)
  for x, y in zip(a, b):
    assert x.tobytes() == y.tobytes()
  c = shapes.sample(4, 'train', 5, 64)
  d = shapes.sample(3, 'val', 5, 64)
  assert a[0].tobytes() != c[0].tobytes() and a[0].tobytes() != d[0].tobytes()


@pytest.mark.parametrize('label', range(len(shapes.CLASSES)))
def test_single_shape_box_is_the_extent_of_its_drawn_pixels(label):
  for seed in range(6):
    image, boxes, labels = shapes.render_image(np.random.default_rng([seed, label]), 64,
                                               labels=[label], clutter=False)
    assert labels.tolist() == [label]
    # Independent segmentation: the flat background is the most common colour.
    flat = image.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    ys, xs = np.nonzero(np.any(image != background, axis=-1))
    assert len(xs) > 0
    np.testing.assert_array_equal(boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_objects_sizes_and_classes_over_many_images():
  counts, areas, labels = [], [], []
  for i in range(120):
    image, boxes, lab = shapes.sample(0, 'train', i, 192)
    assert image.shape == (192, 192, 3) and image.dtype == np.uint8
    assert boxes.dtype == np.float32 and lab.dtype == np.int32
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 192).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    counts.append(len(boxes))
    areas.extend((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    labels.extend(lab)
  areas = np.array(areas)
  assert 2.5 < np.mean(counts) < 4.5 and min(counts) >= 1
  small, large = np.mean(areas < 32 ** 2), np.mean(areas > 96 ** 2)
  assert 0.35 < small < 0.7            # about half the objects are COCO-small
  assert large > 0.01                  # APl is not empty
  assert 0.2 < 1 - small - large       # medium
  assert np.bincount(labels, minlength=5).min() > 0.1 * len(labels)


def test_cli_writes_a_coco_folder_read_by_coco_source(tmp_path):
  out = tmp_path / 'shapes'
  proc = subprocess.run([sys.executable, '-m', 'jaxdet.data.shapes', '--out', str(out),
                         '--num-train', '5', '--num-val', '3', '--size', '48', '--seed', '7'],
                        capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr
  for split, n in (('train', 5), ('val', 3)):
    src = CocoSource(shapes.ann_file(out, split), shapes.img_dir(out, split))
    assert len(src) == n and src.class_names == list(shapes.CLASSES)
    assert src.cat_ids == [1, 2, 3, 4, 5]
    for i in range(n):
      image, boxes, labels = shapes.sample(7, split, i, 48)   # the files are these images
      r = src[i]
      np.testing.assert_array_equal(r['image'], image)
      np.testing.assert_array_equal(r['boxes'], boxes)
      np.testing.assert_array_equal(r['labels'], labels)
      assert r['image_id'] == i + 1 and not r['crowd'].any()
  data = json.loads(open(shapes.ann_file(out, 'val')).read())
  assert data['info']['seed'] == 7 and data['info']['size'] == 48
  # A second run refuses to overwrite.
  proc = subprocess.run([sys.executable, '-m', 'jaxdet.data.shapes', '--out', str(out),
                         '--num-train', '1', '--num-val', '1'], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode != 0 and 'already exists' in proc.stderr
  assert os.listdir(tmp_path) == ['shapes']   # no temp folder left behind


def test_files_do_not_depend_on_the_number_of_workers(tmp_path):
  one = shapes.write_coco(tmp_path / 'one', num_train=4, num_val=2, size=40, seed=3, workers=1)
  two = shapes.write_coco(tmp_path / 'two', num_train=4, num_val=2, size=40, seed=3, workers=2)
  for sub in ('annotations', 'train', 'val'):
    names = sorted(os.listdir(os.path.join(one, sub)))
    assert names == sorted(os.listdir(os.path.join(two, sub)))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(one, sub), os.path.join(two, sub),
                                               names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)


def test_bad_parameters():
  with pytest.raises(ValueError, match='num_train'):
    shapes.write_coco('/nonexistent/x', num_train=0, num_val=1)
  with pytest.raises(ValueError, match='size'):
    shapes.ensure_dataset(num_train=1, num_val=1, size=4)


def test_cache_is_generated_once_and_used_by_build_source(tmp_path):
  ml_collections = pytest.importorskip('ml_collections')
  data = ml_collections.ConfigDict(dict(source='shapes', skip_bad_images=False, shapes=dict(
      num_train=4, num_val=2, size=40, seed=0, cache_dir=str(tmp_path))))
  train = build_source(data, 'train')
  assert len(train) == 4 and train.class_names == list(shapes.CLASSES)
  (root,) = os.listdir(tmp_path)   # one folder, no temp folders
  assert root.startswith('shapes-')
  stamp = os.stat(shapes.ann_file(tmp_path / root, 'train')).st_mtime_ns
  val = build_source(data, 'val')
  assert len(val) == 2 and val.image_ids == [1, 2]
  assert os.stat(shapes.ann_file(tmp_path / root, 'train')).st_mtime_ns == stamp
  data.shapes.seed = 1   # other parameters -> another folder
  build_source(data, 'val')
  assert len(os.listdir(tmp_path)) == 2
