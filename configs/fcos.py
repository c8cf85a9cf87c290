"""FCOS R50-caffe FPN GN-head 1x on COCO (mmdetection's `fcos_r50-caffe_fpn_gn-head_1x_coco`:
36.6 box AP), and its smoke run.

COCO (8 GPUs x 2 images, 12 epochs; ~36.6 mAP in mmdetection):
  python -m jaxdet.train --config configs/fcos.py --workdir work_dirs/fcos_r50_caffe \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017
The backbone is a caffe-style ResNet-50 (stride 2 in the first 1x1 conv, BN frozen: no gradient,
no update, no decay; BGR input, detectron's mean, std 1) started from open-mmlab's ImageNet
weights (mmdetection's 'open-mmlab://detectron/resnet50_caffe'), read from
checkpoints/resnet50_caffe-788b5fa3.pth at init; get it once:
  mkdir -p checkpoints && wget -P checkpoints \
      https://download.openmmlab.com/pretrain/third_party/resnet50_caffe-788b5fa3.pth
Optimizer as mmdetection's config: SGD lr 0.01 for 16 images, momentum 0.9, weight decay 1e-4,
biases 2x lr and no decay, gradients clipped to norm 35; constant warmup (lr / 3) for 500 steps.
Multi-scale 2x (38.5 box AP): configs/fcos_mstrain.py.
Smoke (the same detector, small, on the built-in shapes dataset, no pretrained weights, so the
backbone trains whole with trainable BN): mAP 0.513 (AP50 0.714, AP75 0.575) after 7 epochs =
1750 steps of 8 images, in 4 min 56 s from the command's start (dataset cached, compilation cache
cold; generating the dataset adds ~25 s) on the 2-core CPU at a slow hour (~49 img/s, 2026-12-03
afternoon, GN / BN biases undecayed as mmdetection's); that morning 0.502 in 4 min 0 s at
~59 img/s, and 0.480 in 8 min 43 s at the machine's slow speed (~30 img/s) before XLA:CPU flags:
  python -m jaxdet.train --config configs/fcos.py:smoke
"""
from configs._base_ import data, fcos_r50_caffe_fpn_gn, optimizer, runtime, schedule_1x
from configs._base_ import smoke as _smoke


def get_config(arg=None):
  config = runtime.get_config()
  config.model = fcos_r50_caffe_fpn_gn.get_config(num_classes=80)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 2
  fcos_r50_caffe_fpn_gn.caffe_pipeline(config.data.pipeline)
  config.optimizer = optimizer.sgd(base_lr=0.01, weight_decay=1e-4)  # lr for 16 images
  # mmdetection's paramwise_cfg sets no norm_decay_mult: mmengine then gives GN / BN biases
  # bias_decay_mult (0), their weights the base decay.
  config.optimizer.paramwise.update(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=None)
  config.optimizer.grad_clip = 35.0
  config.schedule = schedule_1x.get_config()
  config.schedule.update(warmup='constant', warmup_iters=500, warmup_ratio=1.0 / 3)
  config.work_dir = 'work_dirs/fcos_r50-caffe_fpn_gn-head_1x_coco'
  config.results_row = dict(network='FCOS', dataset='COCO', backbone='R-50', style='caffe',
                            lr_schd='1x')
  if arg == 'smoke':
    smoke(config)
  elif arg:
    raise ValueError(f"configs/fcos.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def smoke(config):
  """The same modules, assigner, losses and post-processing, sized for a 2-core CPU
  (`fcos_r50_caffe_fpn_gn.small`: trainable BN, regress ranges halved; `smoke.run_size`):
  8 images per step at lr 0.02 (base_lr 0.04 for 16 images), warmup 200 steps, 7 epochs with
  x0.1 at epoch 6 (1750 steps). The probes that chose it: experiments/README.md."""
  fcos_r50_caffe_fpn_gn.small(config.model)
  _smoke.run_size(config, name='fcos', network='FCOS', style='caffe', epochs=7, milestones=(6,),
                  samples_per_gpu=8, base_lr=0.04)  # lr 0.02 at this batch of 8
