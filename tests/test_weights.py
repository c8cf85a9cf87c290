"""PyTorch weights into jaxdet without PyTorch: state_dicts written here as numpy, with the names
torchvision's ResNet and mmdetection 3.3's ATSS give their tensors (the comparisons of the
numbers against PyTorch itself are in test_convert_mmdet.py, marked `torch`)."""
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import convert
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine.schedules import build_schedule
from jaxdet.engine import train_state
from jaxdet.models import weights
from jaxdet.models.backbones import ResNet
from jaxdet.models.detectors import build_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATSS = os.path.join(ROOT, 'configs', 'atss.py')
BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}


def _bn(sd, rng, name, c):
  sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[f'{name}.bias'] = rng.normal(0, 0.1, c).astype(np.float32)
  sd[f'{name}.running_mean'] = rng.normal(0, 0.1, c).astype(np.float32)
  sd[f'{name}.running_var'] = rng.uniform(0.5, 2, c).astype(np.float32)
  sd[f'{name}.num_batches_tracked'] = np.array(7, np.int64)


def _conv(sd, rng, name, cout, cin, k, bias=False):
  sd[f'{name}.weight'] = rng.normal(0, 0.1, (cout, cin, k, k)).astype(np.float32)
  if bias:
    sd[f'{name}.bias'] = rng.normal(0, 0.1, cout).astype(np.float32)


def torchvision_resnet(depth, width=64, seed=0, prefix='', fc=True):
  """torchvision.models.resnetXX(width_per_group...)'s state_dict names and shapes (random)."""
  rng, sd = np.random.default_rng(seed), {}
  _conv(sd, rng, prefix + 'conv1', width, 3, 7)
  _bn(sd, rng, prefix + 'bn1', width)
  expansion = 1 if depth < 50 else 4
  cin = width
  for i, n in enumerate(BLOCKS[depth]):
    planes = width * 2 ** i
    for j in range(n):
      name = f'{prefix}layer{i + 1}.{j}'
      if expansion == 1:
        _conv(sd, rng, f'{name}.conv1', planes, cin, 3)
        _bn(sd, rng, f'{name}.bn1', planes)
        _conv(sd, rng, f'{name}.conv2', planes, planes, 3)
        _bn(sd, rng, f'{name}.bn2', planes)
      else:
        _conv(sd, rng, f'{name}.conv1', planes, cin, 1)
        _bn(sd, rng, f'{name}.bn1', planes)
        _conv(sd, rng, f'{name}.conv2', planes, planes, 3)
        _bn(sd, rng, f'{name}.bn2', planes)
        _conv(sd, rng, f'{name}.conv3', planes * 4, planes, 1)
        _bn(sd, rng, f'{name}.bn3', planes * 4)
      if j == 0 and (i > 0 or cin != planes * expansion):
        _conv(sd, rng, f'{name}.downsample.0', planes * expansion, cin, 1)
        _bn(sd, rng, f'{name}.downsample.1', planes * expansion)
      cin = planes * expansion
  if fc:
    sd['fc.weight'] = rng.normal(0, 0.01, (1000, cin)).astype(np.float32)
    sd['fc.bias'] = np.zeros(1000, np.float32)
  return sd


def mmdet_atss(config, seed=0):
  """mmdetection 3.3's ATSS state_dict names for `config.model` (ResNet + FPN + ATSSHead)."""
  m = config.model
  sd = torchvision_resnet(m.backbone.depth, m.backbone.base_width, seed, 'backbone.', fc=False)
  rng = np.random.default_rng(seed + 1)
  out = m.neck.out_channels
  ins = m.neck.in_channels[m.neck.start_level:]
  for i, cin in enumerate(ins):
    _conv(sd, rng, f'neck.lateral_convs.{i}.conv', out, cin, 1, bias=True)
    _conv(sd, rng, f'neck.fpn_convs.{i}.conv', out, out, 3, bias=True)
  for i in range(len(ins), m.neck.num_outs):
    _conv(sd, rng, f'neck.fpn_convs.{i}.conv', out, out, 3, bias=True)
  feat = m.head.feat_channels
  for tower in ('cls', 'reg'):
    for i in range(m.head.num_convs):
      _conv(sd, rng, f'bbox_head.{tower}_convs.{i}.conv', feat, out if i == 0 else feat, 3)
      sd[f'bbox_head.{tower}_convs.{i}.gn.weight'] = rng.uniform(0.5, 1.5, feat).astype(np.float32)
      sd[f'bbox_head.{tower}_convs.{i}.gn.bias'] = rng.normal(0, 0.1, feat).astype(np.float32)
  _conv(sd, rng, 'bbox_head.atss_cls', m.num_classes, feat, 3, bias=True)
  _conv(sd, rng, 'bbox_head.atss_reg', 4, feat, 3, bias=True)
  _conv(sd, rng, 'bbox_head.atss_centerness', 1, feat, 3, bias=True)
  for i in range(len(m.head.strides)):
    sd[f'bbox_head.scales.{i}.scale'] = np.array(rng.uniform(0.5, 1.5), np.float32)
  return sd


def resnet_target(depth, width):
  """A detector-like variables dict of ShapeDtypeStructs with this ResNet as 'backbone'."""
  module = ResNet(depth=depth, base_width=width)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  head = {'conv_cls': {'kernel': np.ones((3, 3, 8, 2), np.float32)}}
  return {'params': {'backbone': shapes['params'], 'head': head},
          'batch_stats': {'backbone': shapes['batch_stats']}}


def _hwio(a):
  return np.transpose(a, (2, 3, 1, 0))


@pytest.mark.parametrize('depth,width', [(18, 16), (50, 8)])
def test_torchvision_resnet_loads_with_bn_statistics_in_batch_stats(depth, width, caplog):
  sd = torchvision_resnet(depth, width)
  target = resnet_target(depth, width)
  with caplog.at_level(logging.INFO, logger='jaxdet.weights'):
    out = weights.load_backbone_state_dict(target, sd, what='tv.pth')
  p, s = out['params']['backbone'], out['batch_stats']['backbone']
  np.testing.assert_array_equal(p['conv1']['kernel'], _hwio(sd['conv1.weight']))
  np.testing.assert_array_equal(p['bn1']['scale'], sd['bn1.weight'])
  np.testing.assert_array_equal(p['bn1']['bias'], sd['bn1.bias'])
  np.testing.assert_array_equal(s['bn1']['mean'], sd['bn1.running_mean'])
  np.testing.assert_array_equal(s['bn1']['var'], sd['bn1.running_var'])
  np.testing.assert_array_equal(p['layer3_1']['conv2']['kernel'],
                                _hwio(sd['layer3.1.conv2.weight']))
  np.testing.assert_array_equal(p['layer2_0']['downsample_0']['kernel'],
                                _hwio(sd['layer2.0.downsample.0.weight']))
  np.testing.assert_array_equal(s['layer4_0']['downsample_1']['var'],
                                sd['layer4.0.downsample.1.running_var'])
  assert 'mean' not in p['bn1'] and 'scale' not in s['bn1']
  assert out['params']['head'] is target['params']['head']      # the rest untouched
  leaves = jax.tree_util.tree_leaves(out['params']['backbone'])
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in leaves)
  counters = sum(n.endswith('num_batches_tracked') for n in sd)
  assert (len(leaves) + len(jax.tree_util.tree_leaves(s)) + counters + 2) == len(sd)
  assert (f'backbone weights from tv.pth: {len(sd) - counters - 2} tensors loaded'
          in caplog.text)
  assert f'skipped {counters + 2}: fc.weight, fc.bias, {counters} x num_batches_tracked' \
      in caplog.text


def test_missing_tensor_is_an_error_naming_it():
  sd = torchvision_resnet(18, 16)
  del sd['layer2.0.downsample.1.running_var'], sd['layer1.1.conv2.weight']
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.load_backbone_state_dict(resnet_target(18, 16), sd, what='r18.pth')
  message = str(e.value)
  assert message.startswith('r18.pth does not fit the model: missing in the checkpoint: ')
  assert 'params/layer1_1/conv2/kernel (3, 3, 16, 16)' in message
  assert 'batch_stats/layer2_0/downsample_1/var (32,)' in message
  assert 'unused' not in message and 'mis-shaped' not in message and '\n' not in message


def test_unused_and_misshaped_tensors_are_errors_naming_both_shapes():
  sd = torchvision_resnet(18, 16)
  sd['layer4.2.conv1.weight'] = np.zeros((128, 128, 3, 3), np.float32)  # R-34 has 3 blocks
  sd['layer1.0.attention.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  sd['layer1.0.conv1.weight'] = np.zeros((16, 16, 1, 1), np.float32)    # a 1x1, not a 3x3
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.load_backbone_state_dict(resnet_target(18, 16), sd)
  message = str(e.value)
  assert ('unused tensors: layer4.2.conv1.weight (128, 128, 3, 3) '
          '(-> params/layer4_2/conv1/kernel: not in the model), '
          'layer1.0.attention.weight (16, 16, 1, 1) (no jaxdet name for it)') in message
  assert ('mis-shaped: layer1.0.conv1.weight (16, 16, 1, 1) (as (1, 1, 16, 16)) vs '
          'params/layer1_0/conv1/kernel (3, 3, 16, 16)') in message
  assert 'missing' not in message   # a mis-shaped tensor is not reported twice


def test_wrong_depth_lists_the_differences():
  """A ResNet-50 file for a ResNet-18: at most 10 names per kind, then a count."""
  with pytest.raises(weights.WeightsMismatchError, match=r'^r50.pth does not fit the model: '
                     r'unused tensors: layer1\.0\.conv3\.weight .*\.\.\. and 155 more; '
                     r'mis-shaped: layer1\.0\.conv1\.weight .*\.\.\. and 13 more$'):
    weights.load_backbone_state_dict(resnet_target(18, 16), torchvision_resnet(50, 16),
                                     what='r50.pth')


def test_reading_a_pth_without_torch_is_one_line(tmp_path, monkeypatch):
  path = tmp_path / 'resnet50.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)   # `import torch` raises ImportError
  with pytest.raises(weights.TorchRequiredError) as e:
    weights.read_torch_checkpoint(str(path))
  assert str(e.value) == f"reading {path} needs PyTorch: pip install 'jaxdet[torch]'"
  assert isinstance(e.value, ValueError)   # main_error_exit prints it as one line


def _smoke(*overrides):
  return config_cli.load_config(f'{ATSS}:smoke', list(overrides))


def test_coco_configs_name_their_imagenet_weights_and_smoke_needs_none():
  assert (config_cli.load_config(ATSS).model.backbone.pretrained
          == 'checkpoints/resnet50-0676ba61.pth')
  r101 = config_cli.load_config(os.path.join(ROOT, 'configs', 'atss_r101.py'))
  assert r101.model.backbone.pretrained == 'checkpoints/resnet101-63fe2227.pth'
  assert _smoke().model.backbone.pretrained == ''
  for name in ('resnet50-0676ba61.pth', 'resnet101-63fe2227.pth'):
    assert weights.KNOWN_WEIGHTS[name].endswith('/' + name)


def test_missing_pretrained_file_says_where_to_get_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _smoke('--config.model.backbone.pretrained=checkpoints/resnet50-0676ba61.pth')
  detector = build_detector(config.model)
  with pytest.raises(weights.WeightsFileNotFoundError) as e:
    train_state.create_train_state(detector, config, (1, 64, 64, 3), build_schedule(
        0.01, config.schedule, steps_per_epoch=10))
  message = str(e.value)
  assert isinstance(e.value, ValueError) and '\n' not in message
  assert message.startswith('model.backbone.pretrained: checkpoints/resnet50-0676ba61.pth not '
                            'found')
  assert ('mkdir -p checkpoints && wget -P checkpoints '
          'https://download.pytorch.org/models/resnet50-0676ba61.pth') in message
  assert message.endswith('or train from scratch with --config.model.backbone.pretrained=')


def test_pretrained_is_loaded_by_create_train_state(tmp_path, monkeypatch, caplog):
  """The smoke detector (ResNet-18, width 16) from a .pth: backbone params and BN statistics
  from the file, the rest from the init (here a stand-in: every value 0.5, no compilation)."""
  path = tmp_path / 'r18.pth'
  path.write_bytes(b'read by the patched reader')
  sd = torchvision_resnet(18, 16, seed=3)
  monkeypatch.setattr(weights, 'read_torch_checkpoint',
                      lambda p: sd if p == str(path) else pytest.fail(p))
  monkeypatch.setattr(train_state, 'init_variables', lambda detector, shape, seed: jax.tree.map(
      lambda x: np.full(x.shape, 0.5, x.dtype),
      jax.eval_shape(detector.module.init, jax.random.key(seed), jnp.zeros(shape))))
  config = _smoke(f'--config.model.backbone.pretrained={path}')
  detector = build_detector(config.model)
  schedule = build_schedule(0.01, config.schedule, steps_per_epoch=10)
  with caplog.at_level(logging.INFO, logger='jaxdet.weights'):
    state, _ = train_state.create_train_state(detector, config, (1, 64, 64, 3), schedule)
  assert f'backbone weights from {path}' in caplog.text
  np.testing.assert_array_equal(state['params']['backbone']['layer3_0']['conv1']['kernel'],
                                _hwio(sd['layer3.0.conv1.weight']))
  np.testing.assert_array_equal(state['batch_stats']['backbone']['layer1_1']['bn2']['mean'],
                                sd['layer1.1.bn2.running_mean'])
  for part in ('neck', 'head'):
    assert all(np.all(np.asarray(x) == 0.5)
               for x in jax.tree_util.tree_leaves(state['params'][part]))
  assert not any(np.all(np.asarray(x) == 0.5)
                 for x in jax.tree_util.tree_leaves(state['params']['backbone']))
  momentum = jax.tree_util.tree_leaves(state['opt_state'])
  assert len(momentum) >= len(jax.tree_util.tree_leaves(state['params']))


# ------------------------------------------------------------------------- mmdetection -> orbax

@pytest.fixture
def fake_pth(tmp_path, monkeypatch):
  """A file name whose 'contents' (a dict of numpy arrays) the reader returns without torch."""
  files = {}

  def add(name, state):
    path = tmp_path / name
    path.write_bytes(b'read by the patched reader')
    files[str(path)] = state
    return str(path)

  monkeypatch.setattr(weights, 'read_torch_checkpoint', lambda p: files[p])
  return add


def test_convert_mmdet_round_trip_through_orbax(tmp_path, fake_pth, capsys):
  config = _smoke()
  sd = mmdet_atss(config)
  src = fake_pth('atss_mmdet.pth', sd)
  out = str(tmp_path / 'converted')
  returned = convert.main(['--config', f'{ATSS}:smoke', '--from-mmdet', src, '--out', out])
  printed = capsys.readouterr().out
  counters = sum(n.endswith('num_batches_tracked') for n in sd)
  assert f'skipped {counters}: {counters} x num_batches_tracked' in printed
  assert f'python -m jaxdet.evaluate --config {ATSS}:smoke --checkpoint {out}' in printed

  loaded = ckpt.load_params(out)
  assert set(loaded) == {'params', 'batch_stats'}
  shapes = convert.model_shapes(config.model)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(shapes)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded),
                          jax.tree_util.tree_leaves(returned)):
    assert np.asarray(a).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  p, s = loaded['params'], loaded['batch_stats']
  np.testing.assert_array_equal(p['head']['conv_centerness']['kernel'],
                                _hwio(sd['bbox_head.atss_centerness.weight']))
  np.testing.assert_array_equal(p['head']['reg_gns_1']['scale'],
                                sd['bbox_head.reg_convs.1.gn.weight'])
  assert p['head']['scales_2']['scale'].shape == ()
  np.testing.assert_array_equal(p['head']['scales_2']['scale'], sd['bbox_head.scales.2.scale'])
  np.testing.assert_array_equal(p['neck']['lateral_convs_0']['bias'],
                                sd['neck.lateral_convs.0.conv.bias'])
  np.testing.assert_array_equal(p['neck']['fpn_convs_2']['kernel'],
                                _hwio(sd['neck.fpn_convs.2.conv.weight']))
  np.testing.assert_array_equal(s['backbone']['layer4_1']['bn1']['var'],
                                sd['backbone.layer4.1.bn1.running_var'])
  with ckpt.Checkpointer(out) as checkpointer:
    assert checkpointer.all_steps() == [0]


def _error_line(capsys, argv):
  with pytest.raises(SystemExit) as e:
    config_cli.main_error_exit(convert.main, argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err
  return err


def test_convert_mismatch_is_one_line_naming_the_tensors(tmp_path, fake_pth, capsys):
  config = _smoke()
  sd = mmdet_atss(config)
  del sd['bbox_head.scales.1.scale']
  sd['bbox_head.atss_cls.bias'] = np.zeros(80, np.float32)           # COCO's 80 classes
  sd['bbox_head.retina_cls.weight'] = np.zeros((5, 64, 3, 3), np.float32)
  src = fake_pth('bad.pth', sd)
  out = str(tmp_path / 'never')
  err = _error_line(capsys, ['--config', f'{ATSS}:smoke', '--from-mmdet', src, '--out', out])
  assert f'error: {src} does not fit the model:' in err
  assert 'missing in the checkpoint: params/head/scales_1/scale ()' in err
  assert 'bbox_head.retina_cls.weight (5, 64, 3, 3) (no jaxdet name for it)' in err
  assert 'bbox_head.atss_cls.bias (80,) vs params/head/conv_cls/bias (5,)' in err
  assert not os.path.exists(out)


def test_convert_refuses_a_non_empty_out_and_a_missing_input(tmp_path, fake_pth, capsys):
  src = fake_pth('atss.pth', mmdet_atss(_smoke()))
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  err = _error_line(capsys, ['--config', f'{ATSS}:smoke', '--from-mmdet', src,
                             '--out', str(tmp_path / 'full')])
  assert err == f'error: --out {tmp_path / "full"} exists and is not an empty folder'
  err = _error_line(capsys, ['--config', f'{ATSS}:smoke', '--from-mmdet',
                             str(tmp_path / 'nope.pth'), '--out', str(tmp_path / 'o')])
  assert err == f'error: --from-mmdet {tmp_path / "nope.pth"}: file not found'


def test_mmdet_head_tables():
  """The names of mmdetection's RetinaHead / FCOSHead land on DenseHead's modules."""
  model = lambda kind: {'type': kind, 'backbone': {'type': 'resnet'}, 'neck': {'type': 'fpn'}}
  rules = weights.mmdet_rules(model('retinanet'))
  sd = {'bbox_head.retina_cls.weight': np.zeros((18, 4, 3, 3), np.float32),
        'bbox_head.retina_reg.bias': np.zeros(8, np.float32),
        'bbox_head.cls_convs.3.conv.bias': np.zeros(4, np.float32),
        'neck.fpn_convs.4.conv.weight': np.zeros((4, 4, 3, 3), np.float32)}
  target = {'params': {'head': {'conv_cls': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 18),
                                                                            jnp.float32)},
                                'conv_reg': {'bias': jax.ShapeDtypeStruct((8,), jnp.float32)},
                                'cls_convs_3': {'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}},
                       'neck': {'fpn_convs_4': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 4),
                                                                               jnp.float32)}}}}
  out, skipped = weights.torch_to_flax(sd, rules, target)
  assert skipped == [] and out['params']['head']['conv_cls']['kernel'].shape == (3, 3, 4, 18)
  fcos = {'bbox_head.conv_centerness.weight': np.zeros((1, 4, 3, 3), np.float32)}
  target = {'params': {'head': {'conv_centerness': {
      'kernel': jax.ShapeDtypeStruct((3, 3, 4, 1), jnp.float32)}}}}
  weights.torch_to_flax(fcos, weights.mmdet_rules(model('fcos')), target)
  with pytest.raises(ValueError, match=r"model.type='yolo' must be one of \['atss'"):
    weights.mmdet_rules(model('yolo'))


def test_train_names_a_missing_pretrained_file_before_reading_data(tmp_path):
  """A missing ImageNet file stops `jaxdet.train` at once with the one-line how-to-get-it error."""
  from jaxdet.engine import config_cli
  from jaxdet.models import weights
  from jaxdet.train import train_and_evaluate
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  missing = str(tmp_path / 'checkpoints' / 'resnet50-0676ba61.pth')
  config = config_cli.load_config(os.path.join(root, 'configs', 'atss.py:smoke'), [
      f'--config.model.backbone.pretrained={missing}',
      f'--config.data.shapes.cache_dir={tmp_path / "never-built"}'])
  with pytest.raises(weights.WeightsFileNotFoundError, match='resnet50-0676ba61.pth not found.*wget'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'never-built').exists()
