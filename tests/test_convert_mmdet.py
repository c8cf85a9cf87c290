"""Weights from PyTorch against PyTorch: mmdetection 3.3 detectors converted with
`python -m jaxdet.convert` give mmdetection's head outputs and detections; torchvision's ResNet-50
and mmdetection's caffe ResNet-50 loaded as `model.backbone.pretrained` give their features.

Every model has random weights with non-trivial BN statistics (calibrated on the input, so the
activations stay O(1)), random BN / GN affines, Scales and class biases; the same random input
goes into both sides. mmcv-lite has no compiled NMS: mmdetection's post-processing runs with a
plain greedy NMS (tests/mmdet_compat.py, mmcv's `batched_nms` semantics).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdet import convert
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.models import weights
from jaxdet.models.backbones import ResNet
from jaxdet.models.detectors import build_detector
from jaxdet.models.registry import HEADS

import mmdet_compat

pytestmark = pytest.mark.torch

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_HW = (800, 1216)
RTOL = 1e-4            # max |jax - torch| / max |torch|, per output and level
BOX_ATOL, SCORE_ATOL = 0.01, 1e-3
MAX_DIFFS = {}         # name -> measured max relative difference (printed at the end)

# jaxdet config, mmdetection config, how mmdetection's regression output relates to jaxdet's
DETECTORS = {
    'atss': ('configs/atss.py', 'atss/atss_r50_fpn_1x_coco.py', None),
    'retinanet': ('configs/retinanet.py', 'retinanet/retinanet_r50_fpn_1x_coco.py', None),
    # FCOSHead.forward_single returns exp(scale * conv_reg) (norm_on_bbox=False)
    'fcos': ('configs/fcos.py', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', np.exp),
}


def _rel(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def mm():
  """mmdetection's registry and configs (tests/mmdet_compat.py)."""
  torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
  return mmdet_compat.mmdet()


def _randomize(model, run_backbone, images, seed=0):
  """Random BN / GN affines, Scales and class biases; BN statistics from a crop of `images`
  (each BN layer's batch mean and variance as it sees them in one forward pass, the variance
  raised by its mean over the channels)."""
  gen = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))
  bns = []
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        uniform(module.weight, 0.5, 1.5)
        uniform(module.bias, -0.2, 0.2)
        if isinstance(module, torch.nn.BatchNorm2d):
          module.reset_running_stats()
          module.momentum = None        # running stats = the (cumulative) batch statistics
          module.train()
          bns.append(module)
      elif type(module).__name__ == 'Scale':
        uniform(module.scale, 0.5, 1.5)
      elif name.endswith(('_cls', 'conv_cls')) and isinstance(module, torch.nn.Conv2d):
        uniform(module.bias, -4.5, -1.0)  # scores spread over 0.01..0.27, many above score_thr
    run_backbone(images[:, :, :256, :384])   # a crop: statistics as good, 10x less work
    for module in bns:
      # No channel with a near-zero variance: dividing by it would amplify float32 round-off
      # layer after layer (in PyTorch as much as in jaxdet: both drift from float64 by ~1e-4 at
      # layer4 otherwise, ~5e-7 with this).
      module.running_var.add_(module.running_var.mean())
      module.eval()
  model.eval()


def _save(state_dict, path, wrap=True):
  state = {k: v.detach().clone() for k, v in state_dict.items()}
  torch.save(dict(meta=dict(note='jaxdet test'), state_dict=state) if wrap else state, path)
  return path


# ------------------------------------------------------------------------------------ detectors

@pytest.fixture(scope='module', params=list(DETECTORS))
def compared(request, mm, tmp_path_factory):
  """One detector on both sides: raw head outputs and detections of the same input."""
  name = request.param
  jd_config, mm_config, reg_to_mmdet = DETECTORS[name]
  if name not in HEADS:
    pytest.fail(f'jaxdet has no {name!r} head yet (jaxdet.models.registry.HEADS)')
  model, cfg = mmdet_compat.build_model(mm_config, seed=0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((1,) + IMAGE_HW + (3,)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  _randomize(model, model.backbone, x)

  tmp = tmp_path_factory.mktemp(f'convert-{name}')
  pth = _save(model.state_dict(), str(tmp / f'{name}_mmdet.pth'))
  out_dir = str(tmp / 'converted')
  convert.main(['--config', os.path.join(ROOT, jd_config), '--from-mmdet', pth,
                '--out', out_dir])
  variables = ckpt.load_params(out_dir)

  with torch.no_grad():
    mm_outs = model.bbox_head(model.extract_feat(x))
    meta = dict(img_shape=IMAGE_HW, pad_shape=IMAGE_HW, ori_shape=IMAGE_HW,
                scale_factor=(1.0, 1.0))
    mm_det = model.bbox_head.predict_by_feat(*mm_outs, batch_img_metas=[meta], rescale=False,
                                             with_nms=True)[0]

  config = config_cli.load_config(os.path.join(ROOT, jd_config))
  detector = build_detector(config.model)
  batch = dict(img_shape=np.array([IMAGE_HW], np.int32),
               scale_factor=np.ones((1, 2), np.float32), offset=np.zeros((1, 2), np.float32),
               flip=np.zeros((1,), bool))

  @jax.jit
  def forward(variables, images, batch):
    outputs = detector.module.apply(variables, images, train=False)
    return outputs, detector.predict(outputs, batch)

  jd_outs, jd_det = jax.device_get(forward(variables, jnp.asarray(images), batch))
  model.cfg = cfg
  return dict(name=name, mm_outs=mm_outs, mm_det=mm_det, jd_outs=jd_outs, jd_det=jd_det,
              reg_to_mmdet=reg_to_mmdet, variables=variables, state_dict=model.state_dict(),
              model=model, converted=out_dir, jd_config=os.path.join(ROOT, jd_config))


def test_converted_checkpoint_covers_the_model(compared):
  """Every mmdetection tensor became exactly one jaxdet variable (BN counters aside)."""
  state = compared['state_dict']
  counters = [k for k in state if k.endswith('num_batches_tracked')]
  leaves = jax.tree_util.tree_leaves(compared['variables'])
  assert len(leaves) == len(state) - len(counters)
  assert (sum(int(np.prod(np.shape(x))) for x in leaves)
          == sum(v.numel() for k, v in state.items() if k not in counters))


def test_head_outputs_match_mmdet(compared):
  """cls / reg / centerness of every level within RTOL of mmdetection's."""
  name = compared['name']
  mm_outs, jd_outs = compared['mm_outs'], compared['jd_outs']
  kinds = ('cls', 'reg', 'centerness')
  assert len(mm_outs) == sum(o is not None for o in jd_outs)
  worst = {}
  for kind, mm_levels, jd_levels in zip(kinds, mm_outs, jd_outs):
    assert len(mm_levels) == len(jd_levels) == 5
    for level, (m, j) in enumerate(zip(mm_levels, jd_levels)):
      j = np.asarray(j, np.float64)
      if kind == 'reg' and compared['reg_to_mmdet'] is not None:
        j = compared['reg_to_mmdet'](j)
      worst[(kind, level)] = _rel(j, _nhwc(m))
  MAX_DIFFS[f'{name} head outputs'] = max(worst.values())
  bad = {k: v for k, v in worst.items() if v >= RTOL}
  assert not bad, f'{name}: relative differences >= {RTOL}: {bad}'


def test_detections_match_mmdet(compared):
  """mmdetection's post-processing (greedy NMS) vs jaxdet's: same detections in the same order,
  boxes within BOX_ATOL px, scores within SCORE_ATOL, same labels."""
  name, mm_det, jd = compared['name'], compared['mm_det'], compared['jd_det']
  mm_boxes = mm_det.bboxes.numpy()
  mm_scores, mm_labels = mm_det.scores.numpy(), mm_det.labels.numpy()
  valid = np.asarray(jd.valid[0])
  jd_boxes = np.asarray(jd.boxes[0])[valid]
  jd_scores, jd_labels = np.asarray(jd.scores[0])[valid], np.asarray(jd.labels[0])[valid]
  assert len(mm_scores) >= 20, f'{name}: too few detections to compare ({len(mm_scores)})'
  assert len(jd_scores) == len(mm_scores)
  np.testing.assert_array_equal(jd_labels, mm_labels)
  order = _pair_near_ties(jd_boxes, jd_scores, jd_labels, mm_boxes, mm_scores, mm_labels)
  jd_boxes, jd_scores = jd_boxes[order], jd_scores[order]
  box_diff = float(np.abs(jd_boxes - mm_boxes).max())
  score_diff = float(np.abs(jd_scores - mm_scores).max())
  MAX_DIFFS[f'{name} detections ({len(mm_scores)}): box px'] = box_diff
  MAX_DIFFS[f'{name} detections: score'] = score_diff
  assert box_diff < BOX_ATOL and score_diff < SCORE_ATOL, (box_diff, score_diff)


# ------------------------------------------------------------------- any image size (issue 15)

# Image sizes (h, w) whose padded test size is not one of the buckets (800, 1344) / (1344, 800):
# resized to fit (1333, 800) and padded to 32 they become (800, 1216), (640, 1344) and
# (1152, 800). The last two are enlarged (OpenCV's bilinear on both sides: resize_backend='cv2').
ANY_SIZES = ((800, 1216), (480, 1000), (1000, 700))


@pytest.fixture(scope='module')
def any_size_images(tmp_path_factory):
  """PNG files of ANY_SIZES: smooth random colour fields plus noise (uint8 RGB)."""
  folder = tmp_path_factory.mktemp('any-size')
  rng = np.random.default_rng(5)
  paths = []
  for k, (h, w) in enumerate(ANY_SIZES):
    coarse = rng.uniform(0, 255, (h // 50 + 2, w // 50 + 2, 3))
    field = np.kron(coarse, np.ones((50, 50, 1)))[:h, :w]
    pixels = np.clip(field + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    paths.append(str(folder / f'image{k}_{h}x{w}.png'))
    Image.fromarray(pixels).save(paths[-1])
  return paths


def _pair_near_ties(got_boxes, got_scores, got_labels, mm_boxes, mm_scores, mm_labels):
  """Detections whose scores differ by float32 rounding (the random RetinaNet has near-ties such
  as 0.2684675 vs 0.2684674) may come in swapped order: the index of jaxdet's detection paired
  with each of mmdetection's -- the nearest unused neighbour (within 3 places) of equal label and
  score within SCORE_ATOL; elsewhere the same place."""
  order, used = [], set()
  for i in range(len(mm_scores)):
    near = [j for j in range(max(0, i - 3), min(len(got_scores), i + 4)) if j not in used
            and got_labels[j] == mm_labels[i] and abs(got_scores[j] - mm_scores[i]) < SCORE_ATOL]
    j = min(near, key=lambda j: np.abs(got_boxes[j] - mm_boxes[i]).max()) if near else i
    used.add(j)
    order.append(j)
  return np.asarray(order)


def _match(name, how, got_boxes, got_scores, got_labels, mm_det):
  """mmdetection's detections of one image all found in jaxdet's, in the same order."""
  mm_boxes, mm_scores = mm_det.bboxes.numpy(), mm_det.scores.numpy()
  mm_labels = mm_det.labels.numpy()
  assert len(mm_scores) >= 20, f'{name}: too few detections to compare ({len(mm_scores)})'
  assert len(got_scores) == len(mm_scores), (name, how, len(got_scores), len(mm_scores))
  np.testing.assert_array_equal(got_labels, mm_labels)
  got_boxes, got_scores = np.asarray(got_boxes), np.asarray(got_scores)
  order = _pair_near_ties(got_boxes, got_scores, np.asarray(got_labels), mm_boxes, mm_scores,
                          mm_labels)
  box_diff = float(np.abs(got_boxes[order] - mm_boxes).max())
  score_diff = float(np.abs(got_scores[order] - mm_scores).max())
  key = f'{name} any-size detections ({how}): box px'
  MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), box_diff)
  assert box_diff < BOX_ATOL and score_diff < SCORE_ATOL, (name, how, box_diff, score_diff)


def test_detections_match_mmdet_on_images_of_any_size(compared, any_size_images, tmp_path,
                                                       capsys):
  """mmdetection's own inference (its test pipeline: Resize (1333, 800) keep-ratio, then
  DetDataPreprocessor padding each image to a multiple of 32) on images whose padded size is no
  bucket == the converted checkpoint through the Detector API and `python -m jaxdet.infer`
  (default data.test_padding='exact'): every detection, boxes within BOX_ATOL px."""
  from mmdet.apis import inference_detector  # pylint: disable=import-outside-toplevel
  from jaxdet import infer  # pylint: disable=import-outside-toplevel
  from jaxdet.inference import Detector  # pylint: disable=import-outside-toplevel
  name, model = compared['name'], compared['model']
  with torch.no_grad():
    mm_results = [inference_detector(model, path) for path in any_size_images]
  assert ([tuple(r.metainfo['batch_input_shape']) for r in mm_results]
          == [(800, 1216), (640, 1344), (1152, 800)])
  mm_dets = [r.pred_instances for r in mm_results]

  overrides = ['--config.data.pipeline.resize_backend=cv2']
  detector = Detector.from_checkpoint(compared['jd_config'], compared['converted'],
                                      score_thr=0.0, overrides=overrides)
  for r, mm_det in zip(detector(any_size_images), mm_dets):
    _match(name, 'Detector', r.boxes, r.scores, r.labels, mm_det)

  out_json = tmp_path / 'dets.json'
  argv = ['--config', compared['jd_config'], *overrides, '--checkpoint', compared['converted'],
          '--out-json', str(out_json), '--score-thr', '0', *any_size_images]
  try:
    code = config_cli.main_error_exit(infer.main, argv)
  except SystemExit as e:
    code = e.code
  assert code in (0, None), capsys.readouterr().err
  with open(out_json) as f:
    dets = json.load(f)
  label_of = {c: k for k, c in enumerate(detector.cat_ids)}
  for k, mm_det in enumerate(mm_dets):
    mine = [d for d in dets if d['file_name'] == any_size_images[k]]
    xywh = np.array([d['bbox'] for d in mine], np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    _match(name, 'CLI', boxes, [d['score'] for d in mine],
           [label_of[d['category_id']] for d in mine], mm_det)


# ------------------------------------------------------------------------------------ backbones

def _compare_backbone(tmp_path, torch_model, run_torch, style, name):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((1, 203, 299, 3)).astype(np.float32)  # odd sizes: padding
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  _randomize(torch_model, run_torch, x, seed=1)
  path = _save(torch_model.state_dict(), str(tmp_path / f'{name}.pth'), wrap=False)

  module = ResNet(depth=50, style=style, frozen_stages=-1, norm_eval=True)
  init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = weights.load_pretrained_backbone(
      {'params': {'backbone': init['params']}, 'batch_stats': {'backbone': init['batch_stats']}},
      path)
  got = jax.jit(module.apply)({'params': variables['params']['backbone'],
                              'batch_stats': variables['batch_stats']['backbone']}, images)
  with torch.no_grad():
    expected = run_torch(x)
  diffs = [_rel(g, _nhwc(e)) for g, e in zip(got, expected)]
  MAX_DIFFS[f'{name} layer1..4'] = max(diffs)
  assert len(diffs) == 4 and max(diffs) < RTOL, diffs


def test_torchvision_resnet50_as_pretrained(tmp_path, caplog):
  """torchvision resnet50() (random) saved as a raw state_dict -> layer1..4 as torchvision's."""
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(1)
  model = torchvision.models.resnet50()

  def features(x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      x = layer(x)
      outs.append(x)
    return outs

  with caplog.at_level('INFO', logger='jaxdet.weights'):
    _compare_backbone(tmp_path, model, features, 'pytorch', 'torchvision resnet50')
  assert 'skipped 55: fc.weight, fc.bias, 53 x num_batches_tracked' in caplog.text


def test_mmdet_caffe_resnet50_as_pretrained(tmp_path, mm):
  """mmdetection's ResNet(depth=50, style='caffe') (random) -> its four outputs."""
  torch.manual_seed(2)
  model = mm['MODELS'].build(dict(type='ResNet', depth=50, style='caffe', frozen_stages=-1,
                                  norm_eval=True, init_cfg=None))
  model.init_weights()
  _compare_backbone(tmp_path, model, model, 'caffe', 'mmdet caffe resnet50')


def test_reading_pth_variants(tmp_path):
  """A DataParallel 'module.' prefix is dropped, a 'model' entry unwrapped, bf16 read as
  float32; a file torch cannot read is a one-line ValueError."""
  state = {'module.conv1.weight': torch.ones(2, 3, 1, 1, dtype=torch.bfloat16),
           'module.bn1.num_batches_tracked': torch.tensor(3)}
  torch.save({'model': state, 'epoch': 3}, tmp_path / 'dp.pth')
  read = weights.read_torch_checkpoint(str(tmp_path / 'dp.pth'))
  assert list(read) == ['conv1.weight', 'bn1.num_batches_tracked']
  assert read['conv1.weight'].dtype == np.float32 and read['bn1.num_batches_tracked'] == 3
  (tmp_path / 'bad.pth').write_bytes(b'not a torch file')
  with pytest.raises(ValueError, match=r'^cannot read .*bad\.pth with torch\.load: '):
    weights.read_torch_checkpoint(str(tmp_path / 'bad.pth'))


def test_zz_report_max_differences():
  """Prints the measured differences (run with -s to see them)."""
  for key, value in MAX_DIFFS.items():
    print(f'{key}: {value:.3g}')
