"""RetinaNet R50-FPN 1x on COCO (mmdetection's `retinanet_r50_fpn_1x_coco`: 36.5 box AP), and its
smoke run.

COCO (8 GPUs x 2 images, 12 epochs; ~36.5 mAP in mmdetection):
  python -m jaxdet.train --config configs/retinanet.py --workdir work_dirs/retinanet_r50 \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017 \
      --config.model.backbone.pretrained=checkpoints/resnet50-0676ba61.pth
The loss is normalised per device as mmdetection (`model.head.avg_factor='device'`);
`--config.model.head.avg_factor=global` normalises by the mean over devices instead.
Smoke (the same detector, small, on the built-in shapes dataset): mAP 0.531 (AP50 0.734) after
7 epochs = 1750 steps of 8 images, 4 on each of 2 CPU devices, in 6 min 26 s from the command's
start (dataset cached, compilation cache cold) on the 2-core CPU at a slow, noisy hour (~47
img/s, 2026-12-03 afternoon); that morning 0.499 in 4 min 41 s at ~59 img/s (the focal loss's
last digits changed since), and on one CPU device 0.515 in 9 min 22 s (~28 img/s, 2026-12-02):
  python -m jaxdet.train --config configs/retinanet.py:smoke
"""
from configs._base_ import data, optimizer, retinanet_r50_fpn, runtime, schedule_1x, smoke


def get_config(arg=None):
  config = runtime.get_config()
  config.model = retinanet_r50_fpn.get_config(num_classes=80)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 2
  config.optimizer = optimizer.sgd(base_lr=0.01, weight_decay=1e-4)  # lr for 16 images
  config.schedule = schedule_1x.get_config()  # 12 epochs, x0.1 at 8 and 11, warmup 500 from 0.001
  config.work_dir = 'work_dirs/retinanet_r50_fpn_1x_coco'
  config.results_row = dict(network='RetinaNet', dataset='COCO', backbone='R-50',
                            style='pytorch', lr_schd='1x')
  if arg == 'smoke':
    _smoke(config)
  elif arg:
    raise ValueError(f"configs/retinanet.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def _smoke(config):
  """The same modules, assigner, losses and post-processing, sized for a 2-core CPU
  (`retinanet_r50_fpn.small`: GN head, anchors octave_base_scale 2; `smoke.run_size`): 8 images
  per step at lr 0.015 (base_lr 0.03 for 16), warmup 200 steps, 7 epochs, x0.1 at epoch 6
  (1750 steps); on a CPU host 2 XLA devices x 4 images (`config.cpu_devices`). The probes
  that chose it: experiments/README.md."""
  retinanet_r50_fpn.small(config.model)
  smoke.run_size(config, name='retinanet', network='RetinaNet', epochs=7, milestones=(6,),
                 samples_per_gpu=8, base_lr=0.03)  # lr 0.015 at this batch of 8
  config.cpu_devices = 2
  return config
