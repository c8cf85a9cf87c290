"""optax optimizers from `config.optimizer`, with mmengine's paramwise rules.

- The learning rate is scaled linearly to the global batch: `base_lr * global_batch / base_batch`.
- SGD as torch's: weight decay is added to the gradient before momentum (coupled), momentum
  without dampening. AdamW as torch's: decoupled decay `p -= lr * wd * p`, bias-corrected
  moments, eps added to `sqrt(v_hat)` (optax.adamw with eps_root=0; tested against torch).
- Frozen parameters (`frozen` mask, e.g. the first ResNet stage) get no update and no decay
  (mmengine skips parameters with requires_grad=False).
- `grad_clip` (max global L2 norm, mmengine's clip_grad max_norm) clips the raw gradients first.

paramwise: mmengine 0.10's `DefaultOptimWrapperConstructor` rules, per parameter (a multiplier
that is None / absent is "not set", as in mmengine):

1. `custom_keys` {key: {lr_mult, decay_mult}} (both default 1.0). Keys are tried longest first,
   ties in alphabetical order (mmengine: `sorted(sorted(keys), key=len, reverse=True)`), and the
   first key that is a substring of the parameter's name wins. A matched parameter takes
   `lr * lr_mult` and `wd * decay_mult` and NO other rule (bias / norm / DCN rules are skipped).
   The name is the Flax path joined by '/', e.g. 'backbone/layer1_0/conv1/kernel' (mmengine
   matches torch names such as 'backbone.layer1.0.conv1.weight'); a '.' in a key is read as '/'
   (ml_collections' ConfigDict rejects dotted keys). So 'backbone', 'neck', 'sampling_offsets'
   or 'bias' mean what they mean in mmdetection, but keys that spell torch-only names
   ('layer1.0', 'weight', 'bbox_head': jaxdet's head is 'head') match nothing here.
2. Otherwise: `bias_lr_mult` multiplies the lr of every 'bias' except those of normalisation
   layers and of a deformable conv's offset conv; `norm_decay_mult` the decay of the scale and
   bias of normalisation layers; `bias_decay_mult` the decay of the other biases, again except the
   offset conv's -- and, when `norm_decay_mult` is not set, also of normalisation biases (mmengine's
   elif chain); `dcn_offset_lr_mult` the lr of the offset conv's kernel and bias.
   A normalisation layer is a module whose parameters are exactly {'scale', 'bias'} (Flax
   BatchNorm / GroupNorm / LayerNorm). A deformable conv's offset conv is a module named
   'conv_offset' whose parent holds a 'kernel' (jaxdet.models.layers.deform_conv's layout, that of
   mmcv's DCN `*Pack` modules; mmengine applies this rule only when full mmcv is installed).
mmengine's `bypass_duplicate` is accepted and has no effect (Flax parameters are never shared);
`dwconv_decay_mult` and `flat_decay_mult` are not supported (a ValueError).

Parameters are grouped by rule: 'default', 'bias', 'norm', 'frozen' always (the optimizer state of
a model without custom keys or DCN is the same as before these rules existed), plus 'norm_bias'
(norm_decay_mult not set, bias_decay_mult set), 'dcn_offset' and 'custom:<key>' where used.
"""
import jax
import optax

GROUPS = ('default', 'bias', 'norm', 'frozen')
_PARAMWISE_KEYS = ('bias_lr_mult', 'bias_decay_mult', 'norm_decay_mult', 'dcn_offset_lr_mult',
                   'custom_keys', 'bypass_duplicate')
_CUSTOM_KEYS = ('lr_mult', 'decay_mult')


def scaled_lr(base_lr, global_batch, base_batch=16):
  """mmdetection's linear scaling rule."""
  return base_lr * global_batch / base_batch


def lr_scaling_line(base_lr, lr, num_devices, per_device, base_batch):
  """The line train.py prints at start, e.g.
  `global batch 8 = 4 devices x 2 images; lr 0.005 = base_lr 0.01 x 8 / 16 (base batch)`."""
  global_batch = num_devices * per_device
  return (f'global batch {global_batch} = {num_devices} devices x {per_device} images; '
          f'lr {lr:g} = base_lr {base_lr:g} x {global_batch} / {base_batch} (base batch)')


def _paramwise(paramwise):
  """Checked paramwise dict: the known keys, custom keys sorted as mmengine tries them."""
  pw = dict(paramwise or {})
  for key in pw:
    if key not in _PARAMWISE_KEYS:
      raise ValueError(f'optimizer.paramwise.{key} is not supported '
                       f'(have: {", ".join(_PARAMWISE_KEYS)})')
  custom = {}
  for key, value in dict(pw.get('custom_keys') or {}).items():
    value = dict(value or {})
    for k in value:
      if k not in _CUSTOM_KEYS:
        raise ValueError(f'optimizer.paramwise.custom_keys.{key}.{k} is not supported '
                         f'(have: lr_mult, decay_mult)')
    custom[str(key).replace('.', '/')] = value
  pw['custom_keys'] = {k: custom[k] for k in sorted(sorted(custom), key=len, reverse=True)}
  return pw


def _mult(value):
  return 1.0 if value is None else value


def param_labels(params, frozen=None, paramwise=None):
  """A pytree of group names matching `params` (see the module docstring for the rules)."""
  pw = _paramwise(paramwise)
  custom = pw['custom_keys']
  frozen = frozen if frozen is not None else jax.tree_util.tree_map(lambda _: False, params)

  def label_leaf(path, name, is_norm, is_dcn_offset):
    full = '/'.join(path + (name,))
    for key in custom:
      if key in full:
        return 'custom:' + key
    if is_dcn_offset:
      return 'dcn_offset'
    if is_norm:
      no_norm_rule = pw.get('norm_decay_mult') is None and pw.get('bias_decay_mult') is not None
      return 'norm_bias' if name == 'bias' and no_norm_rule else 'norm'
    return 'bias' if name == 'bias' else 'default'

  def label_module(module, frozen_module, path, parent):
    is_norm = set(module) == {'scale', 'bias'} and all(
        not isinstance(v, dict) for v in module.values())
    is_dcn_offset = (bool(path) and path[-1] == 'conv_offset' and parent is not None
                     and 'kernel' in parent and not isinstance(parent['kernel'], dict))
    out = {}
    for name, value in module.items():
      if isinstance(value, dict):
        out[name] = label_module(dict(value), dict(frozen_module[name]), path + (name,), module)
      elif frozen_module[name]:
        out[name] = 'frozen'
      else:
        out[name] = label_leaf(path, name, is_norm, is_dcn_offset)
    return out

  return label_module(dict(params), dict(frozen), (), None)


def group_multipliers(paramwise=None):
  """{group: (lr_mult, decay_mult)} for every group `param_labels` can give (but 'frozen')."""
  pw = _paramwise(paramwise)
  bias_decay = _mult(pw.get('bias_decay_mult'))
  mults = {'default': (1.0, 1.0),
           'bias': (_mult(pw.get('bias_lr_mult')), bias_decay),
           'norm': (1.0, _mult(pw.get('norm_decay_mult'))),
           'norm_bias': (1.0, bias_decay),
           'dcn_offset': (_mult(pw.get('dcn_offset_lr_mult')), 1.0)}
  for key, value in pw['custom_keys'].items():
    mults['custom:' + key] = (_mult(value.get('lr_mult')), _mult(value.get('decay_mult')))
  return mults


def build_optimizer(opt_config, schedule, params, frozen=None):
  """`optax.GradientTransformation` for `params` (a nested dict) from `config.optimizer`.

  opt_config keys: name ('sgd' | 'adamw'), momentum (sgd), betas / eps (adamw), weight_decay,
  grad_clip (None or max norm), paramwise (see the module docstring).
  `schedule` maps the step to the (already batch-scaled) learning rate; a group's lr is
  `schedule(step) * lr_mult` and its weight decay `weight_decay * decay_mult`.
  """
  paramwise = opt_config.get('paramwise', None)
  labels = param_labels(params, frozen, paramwise)
  used = set(jax.tree_util.tree_leaves(labels))
  mults = group_multipliers(paramwise)
  wd = opt_config.get('weight_decay', 0.0)
  name = opt_config.get('name', 'sgd')
  if name not in ('sgd', 'adamw'):
    raise ValueError(f"optimizer.name={name!r} must be 'sgd' or 'adamw'")

  def group(lr_mult, decay_mult):
    lr = lambda step: schedule(step) * lr_mult
    if name == 'sgd':
      decay = optax.add_decayed_weights(wd * decay_mult) if wd * decay_mult else optax.identity()
      return optax.chain(decay, optax.sgd(lr, momentum=opt_config.get('momentum', 0.9) or None))
    b1, b2 = opt_config.get('betas', (0.9, 0.999))
    return optax.adamw(lr, b1=b1, b2=b2, eps=opt_config.get('eps', 1e-8),
                       weight_decay=wd * decay_mult)

  transforms = {g: group(*m) for g, m in mults.items() if g in GROUPS or g in used}
  transforms['frozen'] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, labels)
  clip = opt_config.get('grad_clip', None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
