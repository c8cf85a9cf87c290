"""ATSS R50-FPN 1x on COCO (mmdetection's `atss_r50_fpn_1x_coco`: 39.4 box AP), and its smoke run.

COCO (8 GPUs x 2 images, 12 epochs; ~39.4 mAP; ~10 h on 8 V100s in mmdetection):
  python -m jaxdet.train --config configs/atss.py --workdir work_dirs/atss_r50 \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017
The backbone starts from torchvision's ImageNet ResNet-50 (`model.backbone.pretrained`, as
mmdetection's 'torchvision://resnet50'), read from checkpoints/resnet50-0676ba61.pth at init;
nothing is downloaded at run time. Get it once (PyTorch reads it: pip install 'jaxdet[torch]'):
  mkdir -p checkpoints && wget -P checkpoints https://download.pytorch.org/models/resnet50-0676ba61.pth
(the same file torchvision caches in ~/.cache/torch/hub/checkpoints/). Another path:
--config.model.backbone.pretrained=PATH; from scratch: --config.model.backbone.pretrained=
An mmdetection ATSS checkpoint converts to a jaxdet one (see jaxdet/convert.py):
  python -m jaxdet.convert --config configs/atss.py --from-mmdet atss_r50_fpn_1x_coco.pth \
      --out work_dirs/atss_r50_mmdet
  python -m jaxdet.evaluate --config configs/atss.py --checkpoint work_dirs/atss_r50_mmdet ...
Smoke (the same detector, small, on the built-in shapes dataset, no pretrained weights): on the
idle 2-core CPU 3.9 min from the command's start (dataset cached, compilation cache cold) to
mAP 0.542 (AP50 0.714), 2026-12-03 afternoon at ~68 img/s (3.4 min at 82 img/s that morning;
the dataset's first generation adds more; the shared machine runs up to ~1.4x slower on some
days):
  python -m jaxdet.train --config configs/atss.py:smoke
"""
from configs._base_ import atss_r50_fpn, data, optimizer, runtime, schedule_1x, smoke


def get_config(arg=None):
  config = runtime.get_config()
  config.model = atss_r50_fpn.get_config(num_classes=80)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 2
  config.optimizer = optimizer.sgd(base_lr=0.01, weight_decay=1e-4)  # lr for 16 images
  config.schedule = schedule_1x.get_config()
  config.work_dir = 'work_dirs/atss_r50_fpn_1x_coco'
  config.results_row = dict(network='ATSS', dataset='COCO', backbone='R-50', style='pytorch',
                            lr_schd='1x')
  if arg == 'smoke':
    _smoke(config)
  elif arg:
    raise ValueError(f"configs/atss.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def _smoke(config):
  """The same modules, assigner, losses and post-processing, sized for a 2-core CPU
  (`atss_r50_fpn.small`, `smoke.run_size`): batch 16 at lr 0.02, 7 epochs (875 steps, x0.1 at
  5 and 6). On a CPU host the 16 images of a step go to 2 XLA devices, 8 each
  (`config.cpu_devices`, jaxdet/engine/cpu_devices.py): 8% more images per second on 2
  cores (20% with XLA's default flags), same global batch and lr; the backbone's BN statistics are per 8 images. Probes:
  experiments/README.md."""
  atss_r50_fpn.small(config.model)
  smoke.run_size(config, name='atss', network='ATSS', epochs=7, milestones=(5, 6))
  config.cpu_devices = 2
