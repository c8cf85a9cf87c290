"""Parameter counts (and FLOPs) of a config's detector, without allocating its weights.

  python -m jaxdet.info --config configs/atss.py [--flops] [--config.KEY=VALUE ...]

prints `total N` and the backbone / neck / head split (parameters only, BN running statistics
excluded, as mmdetection counts), e.g. ATSS R50-FPN: total 32,295,322.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.engine import config_cli
from jaxdet.models.detectors import build_detector


def _input_shape(config):
  """(1, H, W, 3): the landscape bucket of the config's image scale (img_scale is (w, h))."""
  from jaxdet.data.transforms import bucket_shapes  # pylint: disable=import-outside-toplevel
  h, w = bucket_shapes(config.data.pipeline, tuple(config.data.img_scale), train=False)[0]
  return (1, h, w, 3)


def count_params(config):
  """dict(total, backbone, neck, head) parameter counts of `config.model` (shape-only init)."""
  detector = build_detector(config.model)
  shapes = detector.init_shapes(_input_shape(config))['params']
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  parts = {name: count(shapes[name]) for name in ('backbone', 'neck', 'head')}
  return dict(total=count(shapes), **parts)


def count_flops(config):
  """Forward FLOPs at the config's input size from XLA's cost analysis (no compilation)."""
  detector = build_detector(config.model)
  image = jax.ShapeDtypeStruct(_input_shape(config), jnp.float32)
  variables = detector.init_shapes(image.shape)
  lowered = jax.jit(lambda v, x: detector.module.apply(v, x, train=False)).lower(variables, image)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


USAGE = config_cli.Usage(
    command='python -m jaxdet.info',
    summary="Parameter counts of a config's detector (total, backbone, neck, head; BN statistics "
            'excluded, as mmdetection counts), without allocating its weights.',
    flags=(('--flops', "also the forward FLOPs at the config's test input size (XLA)"),),
    more='README.md "Models" (the counts of every config).')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  want_flops = '--flops' in argv
  argv = [a for a in argv if a != '--flops']
  spec, overrides, _ = config_cli.parse_args(argv, usage=USAGE)
  config = config_cli.load_config(spec, overrides)
  counts = count_params(config)
  print(f"total {counts['total']:,}")
  for name in ('backbone', 'neck', 'head'):
    print(f'{name} {counts[name]:,}')
  if want_flops:
    shape = _input_shape(config)
    print(f'flops {count_flops(config) / 1e9:.1f} G at input {shape[1]}x{shape[2]}')


if __name__ == '__main__':
  config_cli.main_error_exit(main)
