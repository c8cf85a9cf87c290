"""Evaluate a checkpoint on the config's val set with pycocotools.

  python -m jaxdet.evaluate --config configs/atss.py:smoke --checkpoint work_dirs/atss_smoke \
      [--out detections.json] [--config.KEY=VALUE ...]

`--checkpoint` is a run's work_dir (its latest checkpoint), its `checkpoints` folder, or one
step's folder inside it.
"""
import functools
import sys

import jax

from jaxdet import evaluation
from jaxdet.data import loader as data_loader
from jaxdet.data.sources import build_source, check_num_classes
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags
from jaxdet.engine.steps import AXIS, predict_step
from jaxdet.engine.train_state import replicate
from jaxdet.inference import check_variables
from jaxdet.models.detectors import build_detector, compute_dtype


checkpoint_dir = ckpt.resolve_checkpoint   # (directory, step) of a work_dir / checkpoints / step


USAGE = config_cli.Usage(
    command='python -m jaxdet.evaluate',
    summary="Evaluate a checkpoint on the config's val set with pycocotools (COCO mAP).",
    flags=(('--checkpoint DIR', "a run's work_dir (its latest checkpoint), its checkpoints folder "
                                'or one step folder', True),
           ('--out FILE', 'also write the COCO metrics (mAP, AP50, ...) to this JSON file')),
    more='README.md "Training, evaluation, overrides"; the config file\'s docstring.')


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  spec, overrides, flags = config_cli.parse_args(argv, known_flags=('checkpoint', 'out'),
                                                 usage=USAGE)
  if not flags.get('checkpoint'):
    raise ValueError('--checkpoint DIR is required (a work_dir or its checkpoints folder)')
  config = config_cli.load_config(spec, overrides)
  set_xla_cpu_flags(config)  # before JAX starts its backends
  variables, directory, step = ckpt.load_variables(flags['checkpoint'])
  source = build_source(config.data, 'val')
  check_num_classes(config.model.num_classes, source)
  eval_loader = data_loader.build_eval_loader(config.data, source)
  detector = build_detector(config.model, config.dtype)
  check_variables(detector, variables, eval_loader.shapes[0][1:],
                  what=f'checkpoint {directory}/{step}')
  p_predict = jax.pmap(functools.partial(predict_step, detector=detector,
                                         pipeline=config.data.pipeline,
                                         dtype=compute_dtype(config.dtype)), axis_name=AXIS)
  state = replicate(dict(params=variables['params'],
                         batch_stats=variables.get('batch_stats', {})))
  metrics = evaluation.evaluate_loader(p_predict, state, eval_loader, source)
  if flags.get('out'):
    import json  # pylint: disable=import-outside-toplevel
    with open(flags['out'], 'w') as f:
      json.dump({k: metrics[k] for k in evaluation.METRICS}, f)
  print(evaluation.format_results_table([{k: metrics[k] for k in evaluation.METRICS}]))


if __name__ == '__main__':
  config_cli.main_error_exit(main)
