"""SSD end to end on awkward data: `jaxdet.train` with SSD's own pipeline (Expand ->
MinIoURandomCrop -> Resize -> RandomFlip -> PhotoMetricDistortion) on a COCO folder holding an
image without boxes, a gray image, an RGBA image and an image whose only box no crop can keep
(a 3 x 3 px box: every crop's IoU with it is below the smallest min_iou 0.1, so the crop gives
up and keeps the image, as mmdetection's); then `jaxdet.evaluate`, `jaxdet.Detector` and
`python -m jaxdet.infer` on the checkpoint; a `model.num_classes` that does not match the
dataset is a one-line error before anything compiles.

A small SSD (configs/ssd300.py:smoke's modules at 160 px, 4 steps of 2 images) is trained once."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxdet import evaluate, infer
from jaxdet import train as train_lib
from jaxdet.engine import config_cli
from jaxdet.inference import Detector

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, 'configs', 'ssd300.py') + ':smoke'
CATEGORIES = [dict(id=i + 1, name=n) for i, n in enumerate(
    ('square', 'circle', 'triangle', 'cross', 'ring'))]


def _image(mode, h, w, seed):
  rng = np.random.default_rng(seed)
  channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
  pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode)


def _coco_folder(root):
  """(ann_file, img_dir): 5 images, see the module docstring."""
  img_dir = os.path.join(root, 'images')
  os.makedirs(img_dir)
  specs = [('rgb.png', 'RGB', 120, 100, [[10, 20, 40, 30, 1], [50, 50, 30, 40, 3]]),
           ('empty.png', 'RGB', 90, 90, []),
           ('gray.png', 'L', 100, 80, [[20, 10, 40, 50, 2]]),
           ('rgba.png', 'RGBA', 80, 100, [[5, 5, 50, 40, 4]]),
           ('tiny.png', 'RGB', 160, 160, [[0, 0, 3, 3, 5]])]
  images, annotations = [], []
  for i, (name, mode, h, w, boxes) in enumerate(specs):
    _image(mode, h, w, i).save(os.path.join(img_dir, name))
    images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    for x, y, bw, bh, cat in boxes:
      annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cat,
                              bbox=[x, y, bw, bh], area=bw * bh, iscrowd=0))
  ann_file = os.path.join(root, 'ann.json')
  with open(ann_file, 'w') as f:
    json.dump(dict(images=images, annotations=annotations, categories=CATEGORIES), f)
  return ann_file, img_dir


def _overrides(ann_file, img_dir):
  return [
      '--config.data.source=coco', f'--config.data.train.ann_file={ann_file}',
      f'--config.data.train.img_dir={img_dir}', f'--config.data.val.ann_file={ann_file}',
      f'--config.data.val.img_dir={img_dir}', '--config.data.samples_per_gpu=2',
      '--config.data.val.samples_per_gpu=2', '--config.data.workers_per_gpu=0',
      # SSD's own training pipeline (the smoke uses the plain resize + flip)
      '--config.data.pipeline.kind=ssd', '--config.data.pipeline.photometric_uint8=False',
      '--config.data.pipeline.min_box_size=0.', '--config.log_interval=1']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('ssd')
  ann_file, img_dir = _coco_folder(str(root))
  overrides = _overrides(ann_file, img_dir)
  config = config_cli.load_config(SPEC, overrides + ['--config.max_steps=4'])
  work_dir = str(root / 'run')
  train_lib.train_and_evaluate(config, work_dir)
  return overrides, work_dir, img_dir


def test_trains_on_empty_gray_rgba_and_uncroppable_images(trained):
  _, work_dir, _ = trained
  with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [r['loss'] for r in rows if 'loss' in r and r.get('kind') != 'eval']
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert any(r.get('kind') == 'eval' for r in rows)      # the COCO evaluation ran


def test_evaluate_detector_and_infer(trained, capsys, tmp_path):
  overrides, work_dir, img_dir = trained
  evaluate.main(['--config', SPEC, *overrides, '--checkpoint', work_dir])
  assert 'mAP' in capsys.readouterr().out
  detector = Detector.from_checkpoint(SPEC, work_dir, overrides=overrides)
  for name, (h, w) in (('gray.png', (100, 80)), ('rgba.png', (80, 100))):
    det = detector(os.path.join(img_dir, name), score_thr=0.0)
    assert 0 < len(det.boxes) <= 200                      # SSD's max_per_img
    assert np.all(det.boxes[:, 2:] >= det.boxes[:, :2])
    assert np.all(det.boxes[:, [2, 3]] <= [w, h])         # original-image pixels
  out = tmp_path / 'out'
  infer.main(['--config', SPEC, *overrides, '--checkpoint', work_dir, '--out', str(out),
              '--score-thr', '0', os.path.join(img_dir, 'rgb.png')])
  assert os.listdir(out)


def test_num_classes_that_does_not_match_the_dataset(trained, tmp_path):
  overrides, _, _ = trained
  config = config_cli.load_config(SPEC, overrides + ['--config.model.num_classes=3'])
  with pytest.raises(Exception) as info:
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(info.value)
  assert '\n' not in message and '3' in message and '5' in message, message
