"""What every `:smoke` config shares: the run size of the same detector on the built-in data.

A smoke run keeps the detector's modules, assigner, losses and post-processing; the model base
makes the model small (e.g. `resnet_fpn.small`: ResNet-18 at quarter width, 64-channel FPN over
P3-P5, 2-conv head) and `run_size` sets what is the same for every family: 160 px images of the
shapes dataset (2000 train / 200 val, 5 classes), the batch, the lr for 16 images (scaled to the
batch at start), a warmup of 1600 images, no val-loss pass (the CPU budget goes to training) and
one COCO evaluation at the end. Each detector's config then sets what is its own.
"""
from configs._base_ import resnet_fpn


def run_size(config, *, name, network, backbone='R-18/4', style='pytorch', epochs=8,
             milestones=(6, 7), samples_per_gpu=16, base_lr=0.02):
  """The shared run-size part of a smoke config, in place; returns `config`."""
  config.model.num_classes = 5
  d = config.data
  d.source = 'shapes'
  d.shapes.update(num_train=2000, num_val=200, size=160, seed=0)
  d.img_scale = (160, 160)
  d.samples_per_gpu = samples_per_gpu
  d.workers_per_gpu = 1
  d.max_gt = 16
  d.val.samples_per_gpu = 8
  config.optimizer.base_lr = base_lr
  config.schedule.update(epochs=epochs, warmup_iters=1600 // samples_per_gpu,
                         milestones=tuple(milestones))
  config.workflow = (('train', 1),)
  config.log_interval = 25
  config.eval_interval = epochs
  config.checkpoint_every_minutes = 0   # smoke runs: checkpoints at epoch ends only
  config.work_dir = f'work_dirs/{name}_smoke'
  config.results_row = dict(network=network, dataset='shapes', backbone=backbone, style=style,
                            lr_schd='smoke')
  return config


def shrink(config, *, name, network, style='pytorch', **run):
  """ResNet + FPN + dense-head detectors: `resnet_fpn.small(config.model)` + `run_size`."""
  resnet_fpn.small(config.model)
  return run_size(config, name=name, network=network, style=style, **run)
