"""SSD300 VGG16 on COCO (mmdetection's `ssd300_coco`: 25.5 box AP after 120 epochs), and its
smoke run.

COCO (8 GPUs x 8 images; 24 epochs of the training set repeated 5 times = 120 passes, as
mmdetection's RepeatDataset(times=5)):
  python -m jaxdet.train --config configs/ssd300.py --workdir work_dirs/ssd300 \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017
The backbone starts from mmdetection's caffe VGG16 ('open-mmlab://vgg16_caffe'), read from
checkpoints/vgg16_caffe-292e1171.pth at init; nothing is downloaded at run time. Get it once:
  mkdir -p checkpoints && wget -P checkpoints \
      https://download.openmmlab.com/pretrain/third_party/vgg16_caffe-292e1171.pth
An mmdetection SSD300 checkpoint converts to a jaxdet one:
  python -m jaxdet.convert --config configs/ssd300.py --from-mmdet ssd300_coco.pth \
      --out work_dirs/ssd300_mmdet
Epochs: mmdetection counts 24 epochs of the 5x repeated dataset (issue #2096: "why only 24
epochs?"). Here `data.repeat = 5` does the same: each logged epoch is 5 shuffled passes over the
training set (the loader's first log line says so), the LR steps at epochs 16 and 22.
Smoke (the same detector, narrow, on the built-in shapes dataset, see `_smoke`):
  python -m jaxdet.train --config configs/ssd300.py:smoke
"""
from configs._base_ import data, optimizer, runtime, schedule_1x, smoke, ssd300_vgg

REPEAT = 5          # mmdetection's RepeatDataset(times=5)
EPOCHS, MILESTONES = 24, (16, 22)   # of the repeated dataset ("2x")


def get_config(arg=None):
  config = base_config(input_size=300)
  config.work_dir = 'work_dirs/ssd300_coco'
  config.results_row = dict(network='SSD300', dataset='COCO', backbone='VGG16', style='caffe',
                            lr_schd='120e')
  if arg == 'smoke':
    _smoke(config)
  elif arg:
    raise ValueError(f"configs/ssd300.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def base_config(input_size):
  """SSD300 (input_size 300) or SSD512 (512): model, data, optimizer and schedule."""
  config = runtime.get_config()
  config.model = ssd300_vgg.get_config(num_classes=80)
  if input_size == 512:
    ssd300_vgg.ssd512(config.model)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 8
  config.data.val.samples_per_gpu = 8
  config.data.img_scale = (input_size, input_size)
  config.data.pipeline.update(
      kind='ssd', keep_ratio=False, size_divisor=1,
      mean=(123.675, 116.28, 103.53), std=(1., 1., 1.), to_bgr=False,
      expand_ratio=(1, 4), min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3,
      photometric_uint8=False,   # mmdetection's float, unclipped colour distortion
      min_box_size=0.)           # mmdetection drops no box after the transforms
  config.optimizer = optimizer.sgd(base_lr=2e-3, weight_decay=5e-4, momentum=0.9)
  config.optimizer.base_batch = 64   # mmdetection's auto_scale_lr base_batch_size (8 x 8)
  config.schedule = schedule_1x.get_config(epochs=EPOCHS, milestones=MILESTONES)
  config.schedule.update(warmup='linear', warmup_iters=500, warmup_ratio=0.001)
  config.data.repeat = REPEAT   # each logged epoch = 5 passes over the training set
  return config


def _smoke(config):
  """The same modules, assigner, losses and post-processing, sized for a 2-core CPU
  (`ssd300_vgg.small`: VGG16/8 with BN, five levels, anchors of 16-160 px, 2x the stride as
  SSD300's; `smoke.run_size`): 160 px shapes resized and flipped (no Expand / MinIoURandomCrop /
  colour distortion: their zoom-out makes the objects 2-24 px, too small for a 10-minute run),
  16 images per step at lr 0.02 with the gradient clipped to norm 10 (mmdetection's SSD has no
  clip), warmup 100 steps, 5 epochs, x0.1 at epoch 4 (625 steps). Probes (experiments/README.md):
  anchors as small as the stride gave ~1 positive per object and mAP 0.045 after 500 steps of 8;
  anchors 2x the stride + batch 16: mAP 0.641 after 8 epochs (1000 steps, 765 s). On a CPU host
  2 XLA devices x 8 images (`config.cpu_devices`): mAP 0.582 (AP50 0.850) in 3 min 44 s from
  the command's start on the idle 2-core CPU, 2026-12-03 (one device: 0.563 in 7.8 min on
  2026-12-02 afternoon's slower machine).
  """
  ssd300_vgg.small(config.model)
  smoke.run_size(config, name='ssd300', network='SSD300', backbone='VGG16/8', style='caffe',
                 epochs=5, milestones=(4,), samples_per_gpu=16, base_lr=0.02)
  config.optimizer.base_batch = 16
  config.schedule.warmup_iters = 100
  config.optimizer.grad_clip = 10.
  config.data.pipeline.update(kind='standard', keep_ratio=False, photometric_uint8=True,
                              min_box_size=1.)
  config.data.repeat = 1
  config.checkpoint_interval = 1
  config.cpu_devices = 2
  return config
