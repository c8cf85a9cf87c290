"""A randomly initialised mmdetection 3.3 SSD300 / SSD512, converted with `python -m jaxdet.convert
--config configs/ssd300.py|ssd512.py`, gives mmdetection's head outputs and detections.

mmdetection's side is built from its own configs (`ssd/ssd300_coco.py`, `ssd/ssd512_coco.py`)
with random weights; the class and box convs are rescaled (per level, from one forward pass) so
that the logits spread over a few units and many priors pass score_thr 0.02 -- otherwise the
~1e3-large logits of an untrained VGG make every score 0 or 1. The L2Norm weights are random.
mmcv-lite has no compiled NMS: mmdetection's post-processing runs with a plain greedy class-aware
NMS (tests/mmdet_compat.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import convert
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.models.detectors import build_detector

import mmdet_compat

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, BOX_ATOL, SCORE_ATOL = 1e-4, 0.01, 1e-4
MEASURED = {}


@pytest.fixture(scope='module')
def mm():
  return mmdet_compat.mmdet()


@pytest.fixture(scope='module', params=[300, 512])
def compared(request, mm, tmp_path_factory):
  size = request.param
  model, _ = mmdet_compat.build_model(f'ssd/ssd{size}_coco.py', seed=size)
  model.eval()
  rng = np.random.default_rng(size)
  # A normalised image as the data preprocessor gives (RGB minus the mean, std 1).
  images = (rng.uniform(0, 255, (1, size, size, 3)) - [123.675, 116.28, 103.53])
  images = images.astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  head = model.bbox_head
  # mmdetection 3.3's SSDHead has no `loss_cls` (it computes its loss itself) but its shared
  # predict_by_feat reads `self.loss_cls.custom_cls_channels`: an AttributeError in
  # mmdetection's own SSD inference. None reads as "not custom", its intended path (softmax).
  head.loss_cls = None
  with torch.no_grad():
    model.neck.l2_norm.weight.uniform_(10., 30.)
    feats = model.extract_feat(x)
    for convs, feat, target in ((head.cls_convs, feats, 2.), (head.reg_convs, feats, 0.5)):
      for conv, f in zip(convs, feat):
        out = conv(f)
        conv[0].weight.mul_(target / out.std())
        conv[0].bias.uniform_(-0.5, 0.5)
  path = str(tmp_path_factory.mktemp(f'ssd{size}') / 'ssd_mmdet.pth')
  torch.save(dict(meta=dict(note='jaxdet test'),
                  state_dict={k: v.detach().clone() for k, v in model.state_dict().items()}),
             path)
  out_dir = path[:-4] + '_jaxdet'
  config_path = os.path.join(ROOT, f'configs/ssd{size}.py')
  convert.main(['--config', config_path, '--from-mmdet', path, '--out', out_dir])
  variables = ckpt.load_params(out_dir)

  # Original image 1.5x wider and 0.8x as high, resized to size x size (keep_ratio False).
  ori_hw = (int(size * 0.8), int(size * 1.5))
  scale = (size / ori_hw[1], size / ori_hw[0])          # (w, h) as mmdetection
  with torch.no_grad():
    mm_outs = head(model.extract_feat(x))
    meta = dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=ori_hw,
                scale_factor=scale)
    mm_det = head.predict_by_feat(*mm_outs, batch_img_metas=[meta], rescale=True)[0]

  config = config_cli.load_config(config_path)
  detector = build_detector(config.model)
  batch = dict(img_shape=np.array([[size, size]], np.int32),
               scale_factor=np.array([scale], np.float32), offset=np.zeros((1, 2), np.float32),
               flip=np.zeros((1,), bool))

  @jax.jit
  def forward(variables, images, batch):
    outputs = detector.module.apply(variables, images, train=False)
    return outputs, detector.predict(outputs, batch)

  jd_outs, jd_det = jax.device_get(forward(variables, jnp.asarray(images), batch))
  return dict(size=size, mm_outs=mm_outs, mm_det=mm_det, jd_outs=jd_outs, jd_det=jd_det,
              variables=variables, state_dict=model.state_dict())


def test_converted_checkpoint_covers_the_model(compared):
  leaves = jax.tree_util.tree_leaves(compared['variables'])
  state = compared['state_dict']
  assert len(leaves) == len(state)
  total = sum(int(np.prod(np.shape(v))) for v in leaves)
  assert total == sum(v.numel() for v in state.values())
  assert total == {300: 34_305_206, 512: 36_038_196}[compared['size']]


def test_head_outputs_match_mmdet(compared):
  worst = 0.
  for mm_levels, jd_levels in zip(compared['mm_outs'], compared['jd_outs']):
    assert len(mm_levels) == len(jd_levels) == {300: 6, 512: 7}[compared['size']]
    for m, j in zip(mm_levels, jd_levels):
      m = m.numpy().transpose(0, 2, 3, 1).astype(np.float64)
      assert j.shape == m.shape
      worst = max(worst, float(np.abs(np.asarray(j, np.float64) - m).max() / np.abs(m).max()))
  MEASURED[f'ssd{compared["size"]} head outputs rel'] = worst
  assert worst < RTOL


def test_detections_match_mmdet(compared):
  mm_det, jd = compared['mm_det'], compared['jd_det']
  valid = np.asarray(jd.valid[0])
  assert len(mm_det.scores) >= 100            # max_per_img 200: many detections compared
  assert valid.sum() == len(mm_det.scores)
  np.testing.assert_array_equal(np.asarray(jd.labels[0])[valid], mm_det.labels.numpy())
  box = float(np.abs(np.asarray(jd.boxes[0])[valid] - mm_det.bboxes.numpy()).max())
  score = float(np.abs(np.asarray(jd.scores[0])[valid] - mm_det.scores.numpy()).max())
  MEASURED[f'ssd{compared["size"]} detections ({valid.sum()}) box px / score'] = (box, score)
  assert box < BOX_ATOL and score < SCORE_ATOL


def test_zz_report():
  """Prints the measured differences (run with -s)."""
  for key, value in MEASURED.items():
    print(key, value)
