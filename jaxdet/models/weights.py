"""PyTorch weights into jaxdet variables: ImageNet backbones and mmdetection detectors.

Two uses, one strict mapping:

- `load_pretrained_backbone(variables, path)`: a torchvision ResNet ImageNet `.pth`
  (`resnet50-0676ba61.pth`, ...) or open-mmlab's caffe-style / detectron ResNet
  (`resnet50_caffe-788b5fa3.pth`, `resnet50_msra-5891d200.pth`, ...) into
  `params['backbone']` / `batch_stats['backbone']`. `model.backbone.pretrained` does this at init
  (`jaxdet.engine.train_state.create_train_state`). Where the files come from: `KNOWN_WEIGHTS`.
- `convert_mmdet(state_dict, model_cfg, target)`: an mmdetection 3.x detector's state_dict
  (backbone + neck + head, names from the registered parts) into the detector's variables
  (`python -m jaxdet.convert`).

Names: torchvision's ResNet and mmdetection's (both styles) use the same names, `conv1.weight`,
`bn1.running_mean`, `layer1.0.conv2.weight`, `layer1.0.downsample.1.bias`, ...; jaxdet's modules
are named after them (`conv1`, `bn1`, `layer1_0/conv2`, `layer1_0/downsample_1`). A tensor name
splits into a module path and a leaf: the module path goes through a table of regexes (each
registered part's `torch_names`, e.g. `jaxdet.models.backbones.resnet.TORCH_NAMES`; the first that
matches the whole path wins), the leaf through `_LEAVES`:

  weight (4-d, OIHW) -> params .../kernel (HWIO)   running_mean -> batch_stats .../mean
  weight (2-d, Linear) -> params .../kernel (transposed); nn.Embedding -> .../embedding (as is)
  in_proj_weight / in_proj_bias (nn.MultiheadAttention) -> params .../in_proj/kernel, bias
  weight (1-d, a norm) -> params .../scale         running_var  -> batch_stats .../var
  bias -> params .../bias;  scale (mmcv's Scale) -> params .../scale
  num_batches_tracked -> skipped

Strict: every tensor is used or skipped (skips are logged by name), every variable of the target
is filled, shapes must agree after the transpose; otherwise one `WeightsMismatchError` naming the
tensors (and both shapes). The mapping works on plain `{name: numpy array}` dicts;
`read_torch_checkpoint` (needs PyTorch) makes one from a `.pth`.
"""
import logging
import os
import re
from typing import Mapping, Sequence

import jax
import numpy as np

log = logging.getLogger('jaxdet.weights')

_TORCHVISION = 'https://download.pytorch.org/models/'
_OPENMMLAB = 'https://download.openmmlab.com/pretrain/third_party/'
# File name -> where to download it. torchvision: IMAGENET1K_V1 (mmdetection's 'torchvision://
# resnetXX'); open-mmlab: 'open-mmlab://detectron/resnetXX_caffe' (resnetXX_caffe-*.pth) and
# 'open-mmlab://detectron2/resnetXX_caffe' (resnetXX_msra-*.pth), caffe style, BGR input.
KNOWN_WEIGHTS = {
    'resnet18-f37072fd.pth': _TORCHVISION + 'resnet18-f37072fd.pth',
    'resnet34-b627a593.pth': _TORCHVISION + 'resnet34-b627a593.pth',
    'resnet50-0676ba61.pth': _TORCHVISION + 'resnet50-0676ba61.pth',
    'resnet101-63fe2227.pth': _TORCHVISION + 'resnet101-63fe2227.pth',
    'resnet152-394f9c45.pth': _TORCHVISION + 'resnet152-394f9c45.pth',
    'resnet50_caffe-788b5fa3.pth': _OPENMMLAB + 'resnet50_caffe-788b5fa3.pth',
    'resnet50_msra-5891d200.pth': _OPENMMLAB + 'resnet50_msra-5891d200.pth',
    'resnet101_caffe-3ad79236.pth': _OPENMMLAB + 'resnet101_caffe-3ad79236.pth',
    'resnet101_msra-6cc46731.pth': _OPENMMLAB + 'resnet101_msra-6cc46731.pth',
    'vgg16_caffe-292e1171.pth': _OPENMMLAB + 'vgg16_caffe-292e1171.pth',  # 'open-mmlab://vgg16_caffe'
}


class WeightsMismatchError(ValueError):
  """A checkpoint does not fit the model: missing, unused or mis-shaped tensors (named)."""


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
  """A weights file is not there (a ValueError too, so entry points print one line)."""


class TorchRequiredError(ImportError, ValueError):
  """Reading a .pth needs PyTorch (a ValueError too, so entry points print one line)."""


# ------------------------------------------------------------------------------ name tables
# Each registered part owns its table (`Part.torch_names`, `Head.torch_names`: (torch module path
# regex, jax module path template), '/' separating jax module names); here they are prefixed.

def prefixed(torch_prefix: str, jax_prefix: str, rules):
  """`rules` for tensors under `torch_prefix` ('backbone.') mapped under `jax_prefix`."""
  return tuple((re.escape(torch_prefix) + pattern, f'{jax_prefix}/{template}')
               for pattern, template in rules)


def mmdet_rules(model_cfg):
  """The name table of an mmdetection detector `backbone.* neck.* bbox_head.*` for
  `config.model` (its `type`, `backbone.type` and `neck.type` pick the registered parts)."""
  # pylint: disable=import-outside-toplevel
  from jaxdet.models import detectors  # noqa: F401  (registers every part)
  from jaxdet.models.registry import BACKBONES, HEADS, NECKS
  head = HEADS.get(model_cfg['type'])
  if not head.torch_names:
    raise ValueError(f"converting mmdetection checkpoints of model.type={model_cfg['type']!r} is "
                     'not supported (its Head has no torch_names)')
  return (prefixed('backbone.', 'backbone', BACKBONES.get(model_cfg['backbone']['type']).torch_names)
          + prefixed('neck.', 'neck', NECKS.get(model_cfg['neck']['type']).torch_names)
          + prefixed(head.torch_prefix, 'head', head.torch_names))


_OIHW_TO_HWIO = (2, 3, 1, 0)
# (torch leaf, tensor ndim or None = any) -> (collection, jax leaf, transpose or None)
_LEAVES = {
    ('weight', 4): ('params', 'kernel', _OIHW_TO_HWIO),
    ('weight', 2): ('params', 'kernel', (1, 0)),        # nn.Linear (out, in) -> Dense (in, out)
    # nn.MultiheadAttention's fused input projection (3D, D) -> a Dense `in_proj` (D, 3D)
    ('in_proj_weight', 2): ('params', 'in_proj/kernel', (1, 0)),
    ('in_proj_bias', None): ('params', 'in_proj/bias', None),
    ('weight', 1): ('params', 'scale', None),
    ('bias', None): ('params', 'bias', None),
    ('scale', None): ('params', 'scale', None),
    ('running_mean', None): ('batch_stats', 'mean', None),
    ('running_var', None): ('batch_stats', 'var', None),
}
_SKIPPED_LEAVES = ('num_batches_tracked',)  # BN's step counter: jaxdet has none


# ----------------------------------------------------------------------------------- mapping

def torch_to_flax(state_dict: Mapping[str, np.ndarray], rules, target, *,
                  skip: Sequence[str] = (), what: str = 'checkpoint'):
  """Maps a `{torch name: array}` dict onto the variables `target` by the name table `rules`.

  Args:
    state_dict: tensor name -> numpy array (torch layout: OIHW convs).
    rules: ((regex, template), ...) over torch module paths (see the module docstring).
    target: `{'params': ..., 'batch_stats': ...}` nested dicts of arrays or ShapeDtypeStructs:
      every leaf must be filled, with its shape; values come back in its dtypes.
    skip: regexes of whole tensor names that are expected and dropped (e.g. 'fc\\.weight').
    what: names the checkpoint in messages.
  Returns:
    `(variables, skipped)`: nested dicts of numpy arrays shaped like `target`, and the skipped
    tensor names in order.
  Raises:
    WeightsMismatchError naming every missing, unused and mis-shaped tensor.
  """
  expected = _flatten(target)
  values, skipped, unused, misshaped, sources = {}, [], [], [], {}
  compiled = [(re.compile(p), t) for p, t in rules]
  skip_re = [re.compile(p) for p in skip]
  for name, value in state_dict.items():
    value = np.asarray(value)
    module, _, leaf = name.rpartition('.')
    if leaf in _SKIPPED_LEAVES or any(r.fullmatch(name) for r in skip_re):
      skipped.append(name)
      continue
    jax_module = _rename(compiled, module)
    leaf_rule = _LEAVES.get((leaf, value.ndim)) or _LEAVES.get((leaf, None))
    if jax_module is None or leaf_rule is None:
      unused.append(f'{name} {_shape(value.shape)} (no jaxdet name for it)')
      continue
    collection, jax_leaf, transpose = leaf_rule
    key = (collection, f'{jax_module}/{jax_leaf}')
    embedding = (collection, f'{jax_module}/embedding')
    if leaf == 'weight' and value.ndim == 2 and key not in expected and embedding in expected:
      key, transpose = embedding, None   # nn.Embedding (N, D) -> flax nn.Embed, as it is
    if key not in expected:
      unused.append(f'{name} {_shape(value.shape)} (-> {_key(key)}: not in the model)')
      continue
    if key in sources:
      unused.append(f'{name} (-> {_key(key)}: already filled from {sources[key]})')
      continue
    array = value.transpose(transpose) if transpose else value
    if tuple(array.shape) != tuple(expected[key].shape):
      shown = f' (as {_shape(array.shape)})' if transpose else ''
      misshaped.append(f'{name} {_shape(value.shape)}{shown} vs {_key(key)} '
                       f'{_shape(expected[key].shape)}')
      sources[key] = name
      continue
    sources[key] = name
    values[key] = np.array(array, dtype=expected[key].dtype, order='C')  # keeps 0-d shapes
  missing = [f'{_key(k)} {_shape(v.shape)}' for k, v in expected.items() if k not in sources]
  if missing or unused or misshaped:
    parts = [f'{label} {_listing(items)}' for label, items in
             (('missing in the checkpoint:', missing), ('unused tensors:', unused),
              ('mis-shaped:', misshaped)) if items]
    raise WeightsMismatchError(f'{what} does not fit the model: ' + '; '.join(parts))
  return _unflatten(values), skipped


def _rename(compiled_rules, module):
  """The jax module path of a torch module path by the first rule matching all of it, or None."""
  for regex, template in compiled_rules:
    match = regex.fullmatch(module)
    if match:
      return match.expand(template)
  return None


def skipped_summary(skipped: Sequence[str]) -> str:
  """'fc.weight, fc.bias, 53 x num_batches_tracked' for a log line."""
  counters = [n for n in skipped if n.rpartition('.')[2] in _SKIPPED_LEAVES]
  others = [n for n in skipped if n not in set(counters)]
  parts = list(others) + ([f'{len(counters)} x num_batches_tracked'] if counters else [])
  return ', '.join(parts) if parts else 'none'


def _flatten(tree):
  flat = {}
  for collection, sub in tree.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(sub):
      flat[(collection, '/'.join(str(getattr(p, 'key', p)) for p in path))] = leaf
  return flat


def _unflatten(flat):
  tree = {}
  for (collection, path), value in flat.items():
    node = tree.setdefault(collection, {})
    *parents, leaf = path.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _key(key):
  return f'{key[0]}/{key[1]}'


def _shape(shape):
  return str(tuple(int(s) for s in shape))


def _listing(items, limit=10):
  shown = ', '.join(items[:limit])
  return shown + (f', ... and {len(items) - limit} more' if len(items) > limit else '')


# ------------------------------------------------------------------------------ .pth files

def read_torch_checkpoint(path: str) -> dict:
  """A `.pth` file -> `{name: numpy array}`, in the file's order.

  Accepts a raw state_dict or a dict holding one under 'state_dict' (mmdetection / mmengine) or
  'model'; a 'module.' prefix on every name (DataParallel) is removed. Needs PyTorch, imported
  here only.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsFileNotFoundError(f'weights file not found: {path}')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TorchRequiredError(f"reading {path} needs PyTorch: pip install 'jaxdet[torch]'") from None
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
  except Exception as e:  # pylint: disable=broad-except  (not a torch file, truncated, ...)
    first = str(e).splitlines()[0] if str(e) else ''
    raise ValueError(f'cannot read {path} with torch.load: {type(e).__name__}: {first}') from None
  state = checkpoint
  if isinstance(checkpoint, Mapping):
    for key in ('state_dict', 'model'):
      if isinstance(checkpoint.get(key), Mapping):
        state = checkpoint[key]
        break
  if not isinstance(state, Mapping):
    raise ValueError(f'{path}: expected a state_dict (a dict of tensors), got '
                     f'{type(state).__name__}')
  out = {}
  for name, value in state.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      value = (value.float() if value.is_floating_point() else value).numpy()
    elif not isinstance(value, np.ndarray):
      raise ValueError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor')
    out[name] = value
  if out and all(n.startswith('module.') for n in out):
    out = {n[len('module.'):]: v for n, v in out.items()}
  return out


def missing_weights_message(path: str, key: str = 'model.backbone.pretrained') -> str:
  """'KEY: PATH not found; download it: mkdir -p D && wget -P D URL, or ...' (one line)."""
  name = os.path.basename(path)
  if name in KNOWN_WEIGHTS:
    directory = os.path.dirname(path) or '.'
    how = f'download it: mkdir -p {directory} && wget -P {directory} {KNOWN_WEIGHTS[name]}'
  else:
    how = ('download the ImageNet weights named in the config\'s docstring, e.g. '
           f"{KNOWN_WEIGHTS['resnet50-0676ba61.pth']}")
  return (f'{key}: {path} not found (relative paths are from the current directory); {how}; '
          f'or train from scratch with --config.{key}=')


# ---------------------------------------------------------------------------- entry points

def read_pretrained(path: str, key: str = 'model.backbone.pretrained') -> dict:
  """`read_torch_checkpoint(path)`, or a `WeightsFileNotFoundError` saying where to get it."""
  if not os.path.isfile(path):
    raise WeightsFileNotFoundError(missing_weights_message(path, key))
  return read_torch_checkpoint(path)


def load_pretrained_backbone(variables: dict, path: str,
                             key: str = 'model.backbone.pretrained', *,
                             backbone: str = 'resnet') -> dict:
  """`variables` (`{'params', 'batch_stats'}` of a detector) with the backbone's replaced by the
  ResNet weights in `path` (torchvision or mmdetection / detectron naming; `fc.*` skipped).

  Logs what was loaded and skipped. Raises `WeightsFileNotFoundError` (saying where to get the
  file), `TorchRequiredError`, or `WeightsMismatchError` (e.g. a ResNet-101 file for depth 50);
  all are ValueErrors with one-line messages.
  """
  return load_backbone_state_dict(variables, read_pretrained(path, key), what=path,
                                  backbone=backbone)


def load_backbone_state_dict(variables: dict, state: Mapping[str, np.ndarray], *,
                             what: str = 'state_dict', backbone: str = 'resnet') -> dict:
  """`load_pretrained_backbone` on an already read `{name: array}` dict (no PyTorch needed).
  `backbone`: the registered backbone type whose PyTorch names the file uses."""
  # pylint: disable=import-outside-toplevel
  from jaxdet.models import detectors  # noqa: F401  (registers every part)
  from jaxdet.models.registry import BACKBONES
  part = BACKBONES.get(backbone)
  target = {'params': variables['params']['backbone'],
            'batch_stats': variables.get('batch_stats', {}).get('backbone', {})}
  loaded, skipped = torch_to_flax(state, part.torch_names, target, skip=part.torch_skip,
                                  what=what)
  out = dict(variables)
  out['params'] = {**variables['params'], 'backbone': loaded['params']}
  if loaded.get('batch_stats'):
    out['batch_stats'] = {**variables['batch_stats'], 'backbone': loaded['batch_stats']}
  count = sum(len(jax.tree_util.tree_leaves(v)) for v in loaded.values())
  log.info(f'backbone weights from {what}: {count} tensors loaded '
           f'({len(jax.tree_util.tree_leaves(loaded["params"]))} params, '
           f'{len(jax.tree_util.tree_leaves(loaded.get("batch_stats", {})))} BN statistics); '
           f'skipped {len(skipped)}: {skipped_summary(skipped)}')
  return out


def convert_mmdet(state: Mapping[str, np.ndarray], model_cfg, target, *,
                  what: str = 'mmdetection checkpoint'):
  """An mmdetection 3.x detector state_dict -> `(variables, skipped)` shaped like `target`
  (the detector's `{'params', 'batch_stats'}`, e.g. its `jax.eval_shape`d init), for
  `config.model`."""
  variables, skipped = torch_to_flax(state, mmdet_rules(model_cfg), target, what=what)
  variables.setdefault('batch_stats', {})
  return variables, skipped
