"""optax optimizers from `config.optimizer`, with mmengine's paramwise rules.

- The learning rate is scaled linearly to the global batch: `base_lr * global_batch / base_batch`.
- SGD as torch's: weight decay is added to the gradient before momentum (coupled), momentum without
  dampening; AdamW as torch's (decoupled decay).
- paramwise (mmengine's DefaultOptimWrapperConstructor): `bias_lr_mult` and `bias_decay_mult` apply to
  every bias except those of normalisation layers; `norm_decay_mult` to the scale and bias of
  normalisation layers. A normalisation layer is a module whose parameters are exactly
  {'scale', 'bias'} (Flax BatchNorm / GroupNorm / LayerNorm).
- Frozen parameters (`frozen` mask, e.g. the first ResNet stage) get no update and no decay.
- `grad_clip` (max global L2 norm, mmengine's clip_grad max_norm) clips the raw gradients first.
"""
import jax
import optax

GROUPS = ('default', 'bias', 'norm', 'frozen')


def scaled_lr(base_lr, global_batch, base_batch=16):
  """mmdetection's linear scaling rule."""
  return base_lr * global_batch / base_batch


def lr_scaling_line(base_lr, lr, num_devices, per_device, base_batch):
  """The line train.py prints at start, e.g.
  `global batch 8 = 4 devices x 2 images; lr 0.005 = base_lr 0.01 x 8 / 16 (base batch)`."""
  global_batch = num_devices * per_device
  return (f'global batch {global_batch} = {num_devices} devices x {per_device} images; '
          f'lr {lr:g} = base_lr {base_lr:g} x {global_batch} / {base_batch} (base batch)')


def param_labels(params, frozen=None):
  """A pytree of group names ('default' | 'bias' | 'norm' | 'frozen') matching `params`."""
  frozen = frozen if frozen is not None else jax.tree_util.tree_map(lambda _: False, params)

  def label_module(module, frozen_module):
    is_norm = set(module) == {'scale', 'bias'} and all(
        not isinstance(v, dict) for v in module.values())
    out = {}
    for name, value in module.items():
      if isinstance(value, dict):
        out[name] = label_module(value, frozen_module[name])
      elif frozen_module[name]:
        out[name] = 'frozen'
      elif is_norm:
        out[name] = 'norm'
      elif name == 'bias':
        out[name] = 'bias'
      else:
        out[name] = 'default'
    return out

  return label_module(dict(params), dict(frozen))


def build_optimizer(opt_config, schedule, params, frozen=None):
  """`optax.GradientTransformation` for `params` (a nested dict) from `config.optimizer`.

  opt_config keys: name ('sgd' | 'adamw'), momentum, weight_decay, grad_clip (None or max norm),
  paramwise (bias_lr_mult, bias_decay_mult, norm_decay_mult), betas/eps (adamw).
  `schedule` maps the step to the (already batch-scaled) learning rate.
  """
  pw = opt_config.get('paramwise', None) or {}
  mults = {'default': (1.0, 1.0),
           'bias': (pw.get('bias_lr_mult', 1.0), pw.get('bias_decay_mult', 1.0)),
           'norm': (1.0, pw.get('norm_decay_mult', 1.0))}
  wd = opt_config.get('weight_decay', 0.0)
  name = opt_config.get('name', 'sgd')

  def group(lr_mult, decay_mult):
    lr = lambda step: schedule(step) * lr_mult
    if name == 'sgd':
      decay = optax.add_decayed_weights(wd * decay_mult) if wd * decay_mult else optax.identity()
      return optax.chain(decay, optax.sgd(lr, momentum=opt_config.get('momentum', 0.9) or None))
    if name == 'adamw':
      b1, b2 = opt_config.get('betas', (0.9, 0.999))
      return optax.adamw(lr, b1=b1, b2=b2, eps=opt_config.get('eps', 1e-8),
                         weight_decay=wd * decay_mult)
    raise ValueError(f"optimizer.name={name!r} must be 'sgd' or 'adamw'")

  transforms = {g: group(*m) for g, m in mults.items()}
  transforms['frozen'] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, param_labels(params, frozen))
  clip = opt_config.get('grad_clip', None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
