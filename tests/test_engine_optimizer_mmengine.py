"""jaxdet's optimizer against mmengine 0.10's DefaultOptimWrapperConstructor and torch's optimizers.

A small torch module and the Flax-layout params converted from it (same module names, Flax leaf
names: weight -> kernel (OIHW -> HWIO) / scale, bias) get the same paramwise config. Checked: each
parameter's lr and weight decay (mmengine's param groups vs jaxdet's groups) and the parameters
after three SGD / AdamW steps with the same gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdet.engine.optimizer import build_optimizer, group_multipliers, param_labels

import mmdet_compat

pytestmark = pytest.mark.torch

BASE_LR, BASE_WD = 0.01, 0.05


@pytest.fixture(scope='module')
def mm():
  torch = pytest.importorskip('torch')
  mmdet_compat.stub_compiled_ops()
  ops = pytest.importorskip('mmcv.ops')
  constructor = pytest.importorskip('mmengine.optim.optimizer.default_constructor')
  return dict(torch=torch, ops=ops, constructor=constructor)


def torch_model(mm):
  nn = mm['torch'].nn
  torch = mm['torch']
  torch.manual_seed(0)

  def module(**children):
    m = nn.Module()
    for name, child in children.items():
      setattr(m, name, child)
    return m

  model = module(
      backbone=module(conv=nn.Conv2d(3, 4, 3, bias=False), bn=nn.BatchNorm2d(4),
                      layer=nn.Conv2d(4, 4, 1)),
      neck=module(conv=nn.Conv2d(4, 4, 1), gn=nn.GroupNorm(2, 4)),
      head=module(dcn=mm['ops'].ModulatedDeformConv2dPack(4, 4, 3, padding=1),
                  cls=nn.Conv2d(4, 2, 3), ln=nn.LayerNorm(4), scales=module()))
  model.head.scales.scale = nn.Parameter(torch.tensor(1.5))  # mmdet's Scale: not a norm, no bias
  with torch.no_grad():  # mmcv zero-initialises conv_offset
    for p in model.parameters():
      p.uniform_(-1.0, 1.0)
  model.backbone.conv.weight.requires_grad_(False)
  return model


def to_flax(name, array):
  """torch name + array -> (Flax path tuple, array in Flax layout)."""
  *path, leaf = name.split('.')
  if leaf == 'weight':
    leaf, array = ('kernel', array.transpose(2, 3, 1, 0)) if array.ndim == 4 else ('scale', array)
  return tuple(path) + (leaf,), array


def nest(flat):
  out = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def mmengine_optimizer(mm, model, optimizer, paramwise, full_mmcv):
  """mmengine's optimizer (full_mmcv: as with mmcv-full installed, which enables its DCN rule)."""
  mod = mm['constructor']
  saved = mod.mmcv_full_available
  mod.mmcv_full_available = lambda: full_mmcv
  try:
    cfg = dict(type='OptimWrapper', optimizer=dict(optimizer, lr=BASE_LR, weight_decay=BASE_WD))
    return mod.DefaultOptimWrapperConstructor(cfg, paramwise)(model).optimizer
  finally:
    mod.mmcv_full_available = saved


PARAMWISE = [
    # DETR-like: the backbone at lr x0.1 (custom keys replace the bias / norm rules there).
    dict(custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=1.0)}, bias_lr_mult=2.0,
         bias_decay_mult=0.0, norm_decay_mult=0.0),
    # NAS-FCOS / FCOS-like: no norm_decay_mult (norm biases take bias_decay_mult), DCN offset.
    dict(bias_lr_mult=2.0, bias_decay_mult=0.0),
    dict(bias_lr_mult=2.0, bias_decay_mult=0.5, norm_decay_mult=0.0, dcn_offset_lr_mult=0.1),
    # Ties: 'conv' and 'neck' both match 'neck.conv.*' (same length: alphabetical -> 'conv');
    # 'head.cls' beats 'head'; 'conv' also catches the DCN's conv_offset.
    dict(custom_keys={'neck': dict(lr_mult=0.5), 'conv': dict(lr_mult=3.0, decay_mult=0.0),
                      'head': dict(decay_mult=2.0), 'head.cls': dict(lr_mult=4.0)},
         bias_lr_mult=2.0, bias_decay_mult=0.0),
]


@pytest.mark.parametrize('paramwise', PARAMWISE)
@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_per_parameter_lr_decay_and_three_steps_match_mmengine(mm, name, paramwise):
  torch = mm['torch']
  model = torch_model(mm)
  torch_opt = (dict(type='SGD', momentum=0.9) if name == 'sgd' else
               dict(type='AdamW', betas=(0.8, 0.95), eps=1e-6))
  optimizer = mmengine_optimizer(mm, model, torch_opt, paramwise, full_mmcv=True)
  names = {id(p): n for n, p in model.named_parameters()}
  torch_groups = {names[id(p)]: (g['lr'], g['weight_decay'])
                  for g in optimizer.param_groups for p in g['params']}

  flat = dict(to_flax(n, p.detach().numpy()) for n, p in model.named_parameters())
  params = jax.tree_util.tree_map(jnp.asarray, nest(flat))
  frozen = nest({to_flax(n, p.detach().numpy())[0]: not p.requires_grad
                 for n, p in model.named_parameters()})
  labels = param_labels(params, frozen, paramwise)
  mults = group_multipliers(paramwise)
  for n, p in model.named_parameters():
    label = get(labels, to_flax(n, p.detach().numpy())[0])
    if not p.requires_grad:
      assert label == 'frozen' and n not in torch_groups
      continue
    lr_mult, decay_mult = mults[label]
    assert (BASE_LR * lr_mult, BASE_WD * decay_mult) == pytest.approx(torch_groups[n]), (n, label)
  # Every rule of the test is exercised by some parameter of the model.
  assert {'default', 'bias', 'frozen'} <= set(jax.tree_util.tree_leaves(labels))

  # A plain dict: a ConfigDict would reject the key 'head.cls' ('head/cls' is jaxdet's spelling).
  opt_config = dict(name=name, momentum=0.9, betas=(0.8, 0.95), eps=1e-6, weight_decay=BASE_WD,
                    grad_clip=None, paramwise=paramwise)
  tx = build_optimizer(opt_config, lambda step: BASE_LR, params, frozen)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = {}
    for n, p in model.named_parameters():
      g = rng.normal(size=p.shape).astype(np.float32)
      if p.requires_grad:
        p.grad = torch.from_numpy(g)
      path, g_flax = to_flax(n, g)
      grads[path] = jnp.asarray(g_flax)
    optimizer.step()
    updates, state = tx.update(nest(grads), state, params)
    params = optax.apply_updates(params, updates)
  for n, p in model.named_parameters():
    path, expect = to_flax(n, p.detach().numpy())
    np.testing.assert_allclose(np.asarray(get(params, path)), expect, rtol=2e-5, atol=1e-6,
                               err_msg=n)


def test_dcn_rule_is_the_one_of_mmcv_full(mm):
  """Without full mmcv mmengine treats conv_offset as a plain conv; jaxdet follows mmcv-full
  (where NAS-FCOS trains): the check above would fail for the offset bias otherwise."""
  model = torch_model(mm)
  pw = dict(bias_lr_mult=2.0, bias_decay_mult=0.0)
  lite = mmengine_optimizer(mm, model, dict(type='SGD', momentum=0.9), pw, full_mmcv=False)
  full = mmengine_optimizer(mm, model, dict(type='SGD', momentum=0.9), pw, full_mmcv=True)
  offset_bias = model.head.dcn.conv_offset.bias

  def lr_wd(opt):
    return [(g['lr'], g['weight_decay']) for g in opt.param_groups
            if any(p is offset_bias for p in g['params'])][0]

  assert lr_wd(lite) == pytest.approx((2 * BASE_LR, 0.0))
  assert lr_wd(full) == pytest.approx((BASE_LR, BASE_WD))
  params = {'head': {'dcn': {'kernel': jnp.ones(1), 'bias': jnp.ones(1),
                             'conv_offset': {'kernel': jnp.ones(1), 'bias': jnp.ones(1)}}}}
  label = param_labels(params, None, pw)['head']['dcn']['conv_offset']['bias']
  assert group_multipliers(pw)[label] == (1.0, 1.0)


CONFIGS = ['atss.py', 'atss_r101.py', 'retinanet.py', 'fcos.py', 'fcos_mstrain.py', 'nas_fcos.py',
           'ssd300.py', 'ssd512.py', 'detr.py']


@pytest.mark.parametrize('config_file', CONFIGS)
def test_config_optimizer_is_the_one_of_mmdetection_config(mm, config_file):
  """Each jaxdet config against mmdetection's own config of the same name (its work_dir):
  optimizer type, lr, batch of that lr, momentum / betas, weight decay, grad clip, and every
  parameter's lr and decay from its paramwise rules (mmengine reading mmdetection's
  paramwise_cfg vs jaxdet's labels from the config's), on the small model above."""
  import glob
  import os
  from jaxdet.engine import config_cli
  config = config_cli.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                               config_file))
  name = os.path.basename(config.work_dir)
  found = glob.glob(os.path.join(mmdet_compat.mmdet()['configs'], '*', name + '.py'))
  assert len(found) == 1, (name, found)
  cfg = mmdet_compat.mmdet()['Config'].fromfile(found[0])
  wrapper, opt = cfg.optim_wrapper, config.optimizer
  assert wrapper.optimizer.type.lower() == opt.name
  assert wrapper.optimizer.lr == pytest.approx(opt.base_lr)
  assert cfg.auto_scale_lr.base_batch_size == opt.base_batch
  assert wrapper.optimizer.weight_decay == pytest.approx(opt.weight_decay)
  if opt.name == 'sgd':
    assert wrapper.optimizer.momentum == opt.momentum
  else:
    assert tuple(wrapper.optimizer.get('betas', (0.9, 0.999))) == tuple(opt.betas)
  clip = wrapper.get('clip_grad')
  assert (clip['max_norm'] if clip else None) == opt.grad_clip
  assert clip is None or clip.get('norm_type', 2) == 2

  model = torch_model(mm)
  optimizer = mmengine_optimizer(mm, model, dict(type='SGD', momentum=0.9),
                                 wrapper.get('paramwise_cfg', {}), full_mmcv=True)
  names = {id(p): n for n, p in model.named_parameters()}
  torch_groups = {names[id(p)]: (g['lr'], g['weight_decay'])
                  for g in optimizer.param_groups for p in g['params']}
  paramwise = opt.paramwise.to_dict()
  paramwise['custom_keys'] = {k.replace('/', '.'): v for k, v in paramwise['custom_keys'].items()}
  flat = dict(to_flax(n, p.detach().numpy()) for n, p in model.named_parameters())
  frozen = nest({to_flax(n, p.detach().numpy())[0]: not p.requires_grad
                 for n, p in model.named_parameters()})
  labels = param_labels(nest(flat), frozen, paramwise)
  mults = group_multipliers(paramwise)
  for n, p in model.named_parameters():
    if p.requires_grad:
      lr_mult, decay_mult = mults[get(labels, to_flax(n, p.detach().numpy())[0])]
      assert (BASE_LR * lr_mult, BASE_WD * decay_mult) == pytest.approx(torch_groups[n]), n
