"""The training state of a detector: init, the optimizer over it, and its device placement.

The state is a plain dict `{step, params, batch_stats, opt_state}` (host numpy while saved,
one copy per device while training under pmap). `model.backbone.pretrained` (a ResNet `.pth`,
see `jaxdet.models.weights`) replaces the backbone's random init with ImageNet weights.
"""
import jax
import numpy as np

from jaxdet.engine.optimizer import build_optimizer
from jaxdet.engine.steps import AXIS
from jaxdet.models import weights
from jaxdet.models.registry import BACKBONES, NECKS


def init_variables(detector, image_shape, seed):
  """Model variables ({'params', 'batch_stats'}) for images of `image_shape` (B, H, W, 3)."""
  init = jax.jit(lambda key: detector.init(key, image_shape))
  lowered = init.lower(jax.random.key(seed))
  # XLA:CPU spends ~15 s optimising this run-once program (its random initialisers); without
  # backend optimisation it compiles in ~5 s and runs in a fraction of a second. Its values
  # differ from the optimised program's by 1 ulp in ~4% of entries (no FMA contraction), the
  # same on every run; GPU / TPU keep the default compile.
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.device_get(lowered.compile(compiler_options=options)(jax.random.key(seed)))


def frozen_mask(params, model_cfg):
  """True for parameters that never train, as each registered backbone / neck decides (ResNet:
  its frozen stages and, with `model.backbone.norm_trainable=False` (caffe backbones, BN
  requires_grad=False), its BN scales and biases)."""
  mask = jax.tree_util.tree_map(lambda _: False, params)
  for name, registry in (('backbone', BACKBONES), ('neck', NECKS)):
    part = registry.get(model_cfg[name].type)
    if part.frozen is not None and name in params:
      mask[name] = part.frozen(params[name], model_cfg[name])
  return mask


def create_train_state(detector, config, image_shape, schedule, *, pretrained=None):
  """The host-side training state (params, batch_stats, opt_state, step) and the optimizer.

  The backbone starts from the `.pth` file `pretrained` (default: `model.backbone.pretrained`;
  '' for a random init), read before the init, so a missing file or PyTorch fails at once; a file
  that does not fit is an error naming the tensors.
  """
  if pretrained is None:
    pretrained = config.model.backbone.get('pretrained', '')
  state_dict = weights.read_pretrained(pretrained) if pretrained else None
  variables = init_variables(detector, image_shape, config.seed)
  if state_dict is not None:
    variables = weights.load_backbone_state_dict(variables, state_dict, what=pretrained,
                                                 backbone=config.model.backbone.type)
  params = variables['params']
  tx = build_optimizer(config.optimizer, schedule, params, frozen_mask(params, config.model))
  state = dict(step=np.zeros((), np.int32), params=params,
               batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))
  return state, tx


def device_sharding():
  """Sharding of arrays with a leading device axis over the local devices (pmap's layout)."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree):
  """Put one copy of `tree` on every local device (leading axis = device), as pmap expects."""
  sharding, n = device_sharding(), jax.local_device_count()
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding),
      tree)


def unreplicate(tree):
  """The first device's copy, on the host."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))
