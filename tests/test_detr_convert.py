"""A randomly initialised mmdetection 3.3 DETR R50, converted with `python -m jaxdet.convert
--config configs/detr.py`, gives mmdetection's class logits and boxes for all six decoder layers
and mmdetection's detections, on one padded batch of two images of different sizes (so the
padding mask matters); a checkpoint of another detector is a one-line error.

mmdetection's model: its shipped config, random init (`DETR.init_weights`), then random BN
affines and statistics (calibrated on the input), transformer biases and LayerNorm affines, so
no term is trivially zero or one.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import convert
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.models import weights
from jaxdet.models.detectors import build_detector

import mmdet_compat

pytestmark = pytest.mark.torch

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_HW = (160, 224)                  # the padded batch
IMG_SHAPES = ((160, 224), (130, 190))  # the second image padded bottom and right


def _rel(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def _randomize(model, images):
  gen = torch.Generator().manual_seed(0)
  rand = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))
  bns = []
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        rand(module.weight, 0.5, 1.5)
        rand(module.bias, -0.2, 0.2)
        module.reset_running_stats()
        module.momentum = None
        module.train()
        bns.append(module)
    for name, p in model.named_parameters():
      if not name.startswith(('backbone.', 'neck.')) and (
          name.endswith('bias') or (p.ndim == 1 and 'norm' in name)):
        rand(p, 0.9 if name.endswith('weight') else -0.1, 1.1 if name.endswith('weight') else 0.1)
    model.backbone(images)
    for module in bns:
      module.running_var.add_(module.running_var.mean())
      module.eval()
  model.eval()


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
  DetDataSample = mmdet_compat.mmdet()['DetDataSample']
  logging.getLogger('mmengine').setLevel(logging.WARNING)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  model, _ = mmdet_compat.build_model('detr/detr_r50_8xb2-150e_coco.py', seed=0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2,) + INPUT_HW + (3,)).astype(np.float32)
  for i, (h, w) in enumerate(IMG_SHAPES):
    images[i, h:] = 0
    images[i, :, w:] = 0
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  _randomize(model, x)
  tmp = tmp_path_factory.mktemp('detr-convert')
  pth = str(tmp / 'detr_mmdet.pth')
  torch.save(dict(state_dict={k: v.detach().clone() for k, v in model.state_dict().items()}), pth)

  scale = (0.5, 0.8)
  samples = []
  for hw in IMG_SHAPES:
    s = DetDataSample()
    s.set_metainfo(dict(img_shape=hw, batch_input_shape=INPUT_HW, pad_shape=INPUT_HW,
                        ori_shape=hw, scale_factor=scale))
    samples.append(s)
  with torch.no_grad():
    head_inputs = model.forward_transformer(model.extract_feat(x), samples)
    mm_cls, mm_box = model.bbox_head(**head_inputs)
    mm_det = model.bbox_head.predict_by_feat(mm_cls, mm_box,
                                             batch_img_metas=[s.metainfo for s in samples])

  out_dir = str(tmp / 'converted')
  convert.main(['--config', os.path.join(ROOT, 'configs/detr.py'), '--from-mmdet', pth,
                '--out', out_dir])
  variables = ckpt.load_params(out_dir)
  config = config_cli.load_config(os.path.join(ROOT, 'configs/detr.py'))
  detector = build_detector(config.model)
  batch = dict(img_shape=np.asarray(IMG_SHAPES, np.int32),
               scale_factor=np.asarray([scale] * 2, np.float32), flip=np.zeros(2, bool))

  @jax.jit
  def forward(variables, images, batch):
    outputs = detector.module.apply(variables, images, batch['img_shape'], train=False)
    return outputs, detector.predict(outputs, batch)

  (jd_cls, jd_box), jd_det = jax.device_get(forward(variables, jnp.asarray(images), batch))
  return dict(mm=(mm_cls.numpy(), mm_box.numpy()), jd=(jd_cls, jd_box), mm_det=mm_det,
              jd_det=jd_det, pth=pth, tmp=tmp, config=config, state=model.state_dict(),
              variables=variables)


def test_every_tensor_converted(compared):
  state = compared['state']
  used = [k for k in state if not k.endswith('num_batches_tracked')]
  leaves = jax.tree_util.tree_leaves(compared['variables'])
  assert len(leaves) == len(used)
  params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(
      compared['variables']['params']))
  assert params == 41_575_061


def test_all_six_layers_match_mmdet(compared):
  (mm_cls, mm_box), (jd_cls, jd_box) = compared['mm'], compared['jd']
  assert jd_cls.shape == mm_cls.shape == (6, 2, 100, 81)
  diffs = [(_rel(jd_cls[l], mm_cls[l]), _rel(jd_box[l], mm_box[l])) for l in range(6)]
  print('converted DETR vs mmdetection, max relative difference per layer (cls, box):',
        [(f'{a:.1e}', f'{b:.1e}') for a, b in diffs])
  assert max(max(d) for d in diffs) < 1e-4


def test_detections_match_mmdet(compared):
  det = compared['jd_det']
  for i, res in enumerate(compared['mm_det']):
    order = np.argsort(-res.scores.numpy(), kind='stable')
    np.testing.assert_allclose(det.scores[i], res.scores.numpy()[order], rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(det.labels[i], res.labels.numpy()[order])
    np.testing.assert_allclose(det.boxes[i], res.bboxes.numpy()[order], atol=0.05)


def test_checkpoint_of_another_detector_is_a_one_line_error(compared, tmp_path):
  """An mmdetection DETR file for another model.type / num_classes: one ValueError naming it."""
  config = config_cli.load_config(os.path.join(ROOT, 'configs/atss.py'))
  with pytest.raises(ValueError) as info:
    convert.convert_mmdet_checkpoint(config, compared['pth'], str(tmp_path / 'out'))
  assert '\n' not in str(info.value) and 'does not fit' in str(info.value)
  config = config_cli.load_config(os.path.join(ROOT, 'configs/detr.py'),
                                  ['--config.model.num_classes=20'])
  with pytest.raises(weights.WeightsMismatchError, match='fc_cls'):
    convert.convert_mmdet_checkpoint(config, compared['pth'], str(tmp_path / 'out2'))
