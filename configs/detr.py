"""DETR R50 150 epochs on COCO (mmdetection's `detr_r50_8xb2-150e_coco`: 39.9 box AP), and its
smoke run.

COCO (8 GPUs x 2 images, AdamW lr 1e-4 for 16 images, weight decay 1e-4, backbone lr x0.1,
gradient clip max-norm 0.1, 150 epochs with lr x0.1 at 100, no warmup; DETR's augmentation:
flip, then multi-scale resize (short side 480-800, long <= 1333) or resize 400-600 + random
crop 384-600 + multi-scale resize):
  python -m jaxdet.train --config configs/detr.py --workdir work_dirs/detr_r50 \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017 \
      --config.model.backbone.pretrained=checkpoints/resnet50-0676ba61.pth
An mmdetection DETR checkpoint converts to a jaxdet one (outputs of all six decoder layers
equal mmdetection's, see tests/test_detr_convert.py):
  python -m jaxdet.convert --config configs/detr.py --from-mmdet detr_r50_8xb2-150e_coco.pth \
      --out work_dirs/detr_r50_mmdet
Smoke (the same modules, small, on the built-in shapes dataset; see `_smoke`): DETR needs a
pretrained backbone (from scratch its queries never specialise in 15 CPU minutes), so the
smoke starts from the backbone that the ATSS smoke trains on the same data -- run README
command 1 first (`python -m jaxdet.train --config configs/atss.py:smoke`, it leaves
work_dirs/atss_smoke); `config.load_from` then takes the backbone from it (the ATSS neck and
head do not fit DETR's and keep their fresh init). Then:
  python -m jaxdet.train --config configs/detr.py:smoke
"""
from configs._base_ import data, detr_r50, optimizer, runtime, schedule_1x

ATSS_SMOKE = 'work_dirs/atss_smoke'


def get_config(arg=None):
  config = runtime.get_config()
  config.model = detr_r50.get_config(num_classes=80)
  config.data = data.get_config()
  config.data.source = 'coco'
  config.data.samples_per_gpu = 2
  config.data.pipeline.update(kind='detr', size_divisor=1)
  config.optimizer = optimizer.adamw(base_lr=1e-4, weight_decay=1e-4)   # lr for 16 images
  config.optimizer.grad_clip = 0.1
  config.optimizer.paramwise.custom_keys = {'backbone': dict(lr_mult=0.1, decay_mult=1.0)}
  config.schedule = schedule_1x.get_config(epochs=150, milestones=(100,))
  config.schedule.update(warmup=None, warmup_iters=0)
  config.work_dir = 'work_dirs/detr_r50_8xb2-150e_coco'
  config.results_row = dict(network='DETR', dataset='COCO', backbone='R-50', style='pytorch',
                            lr_schd='150e')
  if arg == 'smoke':
    _smoke(config)
  elif arg:
    raise ValueError(f"configs/detr.py: unknown argument {arg!r} (have: 'smoke')")
  return config


def _smoke(config):
  """DETR made small for a 2-core CPU (issue #22's prototype recipe): the ATSS smoke's ResNet-18
  at quarter width (C4, stride 16: 10 x 10 = 100 tokens at 160 px) with stage 1 frozen and its
  BN statistics frozen, backbone lr x0.1; a 1x1 projection to 128; 1 encoder + 3 decoder
  layers, 8 heads, FFN 512, 12 queries (the shapes images hold at most 6 objects), no dropout
  (a departure from DETR's 0.1: on 2,000 images it only slowed learning, and it cost ~15% of
  the step); AdamW lr 4e-4 for 8 images, clip 0.1, no warmup; batch 8 (on a CPU host 2 XLA
  devices x 4: `config.cpu_devices`, as the ATSS smoke); 24 epochs, lr x0.1 at 22.
  Measured on the idle 2-core CPU (experiments/README.md, DETR and issue 20): mAP 0.196
  (AP50 0.397) in 8.6 min from the command's start at ~100-115 img/s (2026-12-03, XLA's default
  flags, compilation cache cold; floor 0.15 in 15 min); with jaxdet's XLA:CPU flags 0.191 in
  9.1 min; before this session's convolution change 0.166 in 7.1 min at ~125 img/s; on one CPU
  device 0.160 in 9.6 min at ~88 img/s, with dropout 0.1 0.157 in 12.1 min (2026-12-02)."""
  m = config.model
  m.num_classes = 5
  m.backbone.update(depth=18, base_width=16, out_indices=(2,), frozen_stages=1, norm_eval=True,
                    norm_trainable=False, pretrained='')
  m.neck.update(in_channels=(64,), out_channels=128)
  m.head.update(embed_dims=128, num_heads=8, num_encoder_layers=1, num_decoder_layers=3,
                feedforward_channels=512, num_queries=12, dropout=0.)
  config.load_from = ATSS_SMOKE
  d = config.data
  d.source = 'shapes'
  d.shapes.update(num_train=2000, num_val=200, size=160, seed=0)
  d.img_scale = (160, 160)
  d.pipeline.update(kind='standard', size_divisor=32)
  d.samples_per_gpu = 8
  d.workers_per_gpu = 1
  d.max_gt = 12                     # = num_queries (the data has at most 6 per image)
  d.val.samples_per_gpu = 8
  config.cpu_devices = 2
  config.xla_cpu_flags = ''         # XLA's defaults: 8% faster here (jaxdet/engine/xla_cpu_flags.py)
  epochs = 24                       # 48,000 images: ~8.6 min at ~100-115 img/s (experiments/README.md)
  config.optimizer.update(base_lr=4e-4, base_batch=8)
  config.schedule.update(epochs=epochs, milestones=(22,))   # lr x0.1 for the last 2 epochs
  config.workflow = (('train', 1),)
  config.log_interval = 25
  config.eval_interval = epochs
  config.checkpoint_interval = 5
  config.work_dir = 'work_dirs/detr_smoke'
  config.results_row = dict(network='DETR', dataset='shapes', backbone='R-18/4', style='pytorch',
                            lr_schd='smoke')
  return config
