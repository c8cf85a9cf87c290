"""An mmdetection 3.x checkpoint -> a jaxdet checkpoint that `jaxdet.evaluate` and `load_from` read.

  python -m jaxdet.convert --config configs/atss.py --from-mmdet atss_r50_fpn_1x_coco.pth \
      --out work_dirs/atss_r50_mmdet [--config.KEY=VALUE ...]
  python -m jaxdet.evaluate --config configs/atss.py --checkpoint work_dirs/atss_r50_mmdet

`--from-mmdet`: a detector `.pth` of mmdetection 3.x (its `state_dict` entry, or a bare
state_dict): one you trained, or one of the model zoo's, listed as `Weights:` in mmdetection's
configs/<detector>/metafile.yml, e.g. ATSS R50-FPN 1x (39.4 AP):
  mkdir -p checkpoints && wget -P checkpoints https://download.openmmlab.com/mmdetection/v2.0/atss/atss_r50_fpn_1x_coco/atss_r50_fpn_1x_coco_20200209-985f7bd0.pth
Reading it needs PyTorch (`pip install 'jaxdet[torch]'`); nothing is downloaded at run time.
`--config`: the jaxdet config of the same detector (configs/atss.py for `atss_r50_fpn_1x_coco`,
configs/atss_r101.py for R-101, ...). Its `model` must match the checkpoint exactly: the
conversion is strict -- every tensor of the file is used (BN's `num_batches_tracked` is skipped),
every parameter and BN statistic of the config's detector is filled, with its shape; anything else
is an error naming the tensors and both shapes (e.g. `num_classes`, depth or FPN extra-conv
mode differing). Converted: `backbone.*` (ResNet, pytorch or caffe style), `neck.*` (FPN) and
`bbox_head.*` of every registered head with PyTorch names (`Head.torch_names`: ATSS, RetinaNet,
FCOS).
`--out`: a new (or empty) folder; the checkpoint is its step 0 (`ckpt.load_params(DIR)`).

For mmdetection's numbers, evaluate with the data settings of the mmdetection config: the same
test scale and normalisation (its `data_preprocessor`; the caffe-style FCOS: BGR, mean
(102.9801, 115.9465, 122.7717), std 1, as configs/fcos.py sets).
"""
import os
import sys

import jax
import numpy as np

from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.models import weights
from jaxdet.models.detectors import build_detector


def model_shapes(model_cfg):
  """The detector's `{'params', 'batch_stats'}` as ShapeDtypeStructs (no weights allocated)."""
  detector = build_detector(model_cfg)
  # 512 px: every registered detector builds there (SSD300's last levels need >= 3 px maps)
  shapes = detector.init_shapes((1, 512, 512, 3))
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def convert_mmdet_checkpoint(config, in_path, out_dir, *, config_name=''):
  """Converts `in_path` (mmdetection) for `config.model` and saves it as step 0 of `out_dir`.

  Returns `(variables, skipped)`: the saved `{'params', 'batch_stats'}` (numpy) and the names of
  the skipped tensors. Raises ValueError subclasses with one-line messages.
  """
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ValueError(f'--out {out_dir} exists and is not an empty folder')
  state = weights.read_torch_checkpoint(in_path)
  target = model_shapes(config.model)
  variables, skipped = weights.convert_mmdet(state, config.model, target, what=in_path)
  with ckpt.Checkpointer(out_dir, max_to_keep=1) as checkpointer:
    checkpointer.save(0, variables, data_state={},
                      extra=dict(converted_from=os.path.abspath(in_path), format='mmdetection',
                                 config=config_name, model_type=config.model.type))
  return variables, skipped


USAGE = config_cli.Usage(
    command='python -m jaxdet.convert',
    summary='An mmdetection 3.x checkpoint -> a jaxdet checkpoint that jaxdet.evaluate and '
            'load_from read (strict: every tensor used, every parameter filled).',
    flags=(('--from-mmdet FILE.pth', "an mmdetection 3.x detector checkpoint (reading it needs "
                                     'PyTorch)', True),
           ('--out DIR', 'a new (or empty) folder for the jaxdet checkpoint', True)),
    more='python -m pydoc jaxdet.convert (which checkpoints, which config); README.md '
         '"Pretrained backbones and mmdetection checkpoints".')


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  spec, overrides, flags = config_cli.parse_args(argv, known_flags=('from_mmdet', 'out'),
                                                 usage=USAGE)
  if not isinstance(flags.get('from_mmdet'), str) or not isinstance(flags.get('out'), str):
    raise ValueError('usage: python -m jaxdet.convert --config CONFIG.py --from-mmdet IN.pth '
                     '--out DIR')
  config = config_cli.load_config(spec, overrides)
  in_path, out_dir = flags['from_mmdet'], flags['out']
  if not os.path.isfile(in_path):
    raise ValueError(f'--from-mmdet {in_path}: file not found')
  variables, skipped = convert_mmdet_checkpoint(config, in_path, out_dir, config_name=spec)
  leaves = jax.tree_util.tree_leaves(variables)
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'converted {len(leaves)} tensors ({total:,} parameters) of {in_path} for '
        f'model.type={config.model.type!r}; skipped {len(skipped)}: '
        f'{weights.skipped_summary(skipped)}')
  print(f'saved {os.path.join(out_dir, "0")}; evaluate with:\n'
        f'  python -m jaxdet.evaluate --config {spec} --checkpoint {out_dir}')
  return variables


if __name__ == '__main__':
  config_cli.main_error_exit(main)
