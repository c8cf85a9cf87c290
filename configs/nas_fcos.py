"""NAS-FCOS R50-caffe, NAS-FCOS FPN + NAS head, GN head, 1x, 4 x 4 images on COCO (mmdetection's
`nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco`: 39.4 box AP), and its smoke run.

COCO (16 images per step, e.g. 4 devices x 4 images; 12 epochs):
  python -m jaxdet.train --config configs/nas_fcos.py --workdir work_dirs/nas_fcos_r50_caffe \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017
The backbone is a caffe-style ResNet-50 with BN eps 0, frozen, started from detectron2's MSRA
ImageNet weights (mmdetection's 'open-mmlab://detectron2/resnet50_caffe'), read from
checkpoints/resnet50_msra-5891d200.pth at init; get it once:
  mkdir -p checkpoints && wget -P checkpoints \
      https://download.openmmlab.com/pretrain/third_party/resnet50_msra-5891d200.pth
Optimizer as mmdetection's config: SGD lr 0.01 for 16 images, momentum 0.9, weight decay 1e-4,
paramwise bias_lr_mult 2 and bias_decay_mult 0 with norm_decay_mult not set (mmengine: biases of
BN / GN layers keep lr x1 and get no decay; the DCN offset convs' biases keep lr x1 and decay
1e-4); no gradient clipping; linear warmup from 0.001 over 500 steps; 12 epochs, x0.1 at 8 and 11.
Parameters: 38,567,674 (backbone 23,508,032, neck 10,690,696, head 4,368,946), as mmdetection's.
Smoke (the same detector, small, on the built-in shapes dataset):
  python -m jaxdet.train --config configs/nas_fcos.py:smoke
  -> mAP 0.476 in 9 min 11 s on the idle 2-core CPU (~25 img/s, dataset cached, compilation
  cache cold, jaxdet's XLA:CPU flags; 2026-12-03 morning); 0.481 in 10 min 12 s (and 12 min 9 s
  in an earlier run) that afternoon on a slower, noisier machine (~22 img/s; the morning's code
  took 10 min 20 s then, for its 0.476). 5 epochs
  gave 0.419 in 7 min 57 s (0.457 in 8 min 27 s before the flags): the margins are thin both ways.
"""
from configs._base_ import data, nas_fcos_r50_caffe, optimizer, runtime, schedule_1x
from configs._base_ import smoke as _smoke
from configs._base_.nas_fcos_r50_caffe import INF


def get_config(arg=None):
  config = runtime.get_config()
  config.model = nas_fcos_r50_caffe.get_config(num_classes=80)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 4
  nas_fcos_r50_caffe.caffe_pipeline(config.data.pipeline)
  config.optimizer = optimizer.sgd(base_lr=0.01, weight_decay=1e-4, momentum=0.9)  # 16 images
  config.optimizer.paramwise.update(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=None)
  config.schedule = schedule_1x.get_config()  # linear warmup 500 from 0.001, 12 epochs, 8 / 11
  config.work_dir = 'work_dirs/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco'
  config.results_row = dict(network='NAS-FCOS', dataset='COCO', backbone='R-50', style='caffe',
                            lr_schd='1x')
  if arg == 'smoke':
    smoke(config)
  elif arg:
    raise ValueError(f"configs/nas_fcos.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def smoke(config):
  """The same modules (searched FPN with DCNv2 cells and trained BN, searched head with DCNv2,
  FCOS assignment / losses / post-processing), sized for a 2-core CPU (`configs/_base_/smoke.py`):
  ResNet-18/4 trained whole, a 32-channel FPN over P3-P5 (no extra levels) and head (GN 8: 4
  channels per group, as the other smokes' 64 / 16), regress ranges halved as FCOS's smoke;
  8 images per step at lr 0.02, 6 epochs (1500 steps), x0.1 at epoch 5. The backbone's BN trains
  with batch statistics from scratch, so it keeps eps 1e-5 (eps 0 divides by zero on a dead
  channel).
  Cost (experiments/README.md, NAS-FCOS; loaded machine): at 64 channels a step took ~4 CPU-s,
  about 2.5x FCOS smoke's; at 32 channels ~1.5 CPU-s, about FCOS smoke's; the train step
  compiles in ~130 CPU-s (11 grouped DCN calls).
  """
  _smoke.shrink(config, name='nas_fcos', network='NAS-FCOS', style='caffe', epochs=6,
                milestones=(5,), samples_per_gpu=8, base_lr=0.04)  # lr 0.02 at this batch of 8
  config.model.backbone.update(norm_trainable=True, bn_eps=1e-5)
  config.model.neck.out_channels = 32
  config.model.head.update(feat_channels=32, gn_groups=8)
  config.model.head.regress_ranges = ((-1, 32), (32, 64), (64, INF))
  del config.model.head['num_convs']  # shrink()'s tower depth: the searched tower is fixed
