"""What every `:smoke` config shares: the same detector made small for the built-in shapes dataset.

A smoke run keeps the detector's modules, assigner, losses and post-processing and changes only
sizes: ResNet-18 at quarter width trained whole (no pretrained weights, so no frozen stage and
BN with batch statistics), a 64-channel FPN over P3-P5, a 2-conv head, 160 px images of the
shapes dataset (2000 train / 200 val, 5 classes), batch 16 (RetinaNet and FCOS use 8), SGD
lr 0.02 for 16 images, a short warmup, no val-loss pass (the 10-minute CPU budget goes to
training) and one COCO evaluation at the end. Each detector's config then sets what is its own
(head sizes, anchors, ranges, batch, lr).
"""


def shrink(config, *, name, network, style='pytorch', epochs=8, milestones=(6, 7),
           samples_per_gpu=16, base_lr=0.02):
  """Turns a full COCO `config` into its smoke run, in place; returns it.

  `base_lr` is for 16 images (scaled to the batch at start); the warmup covers 1600 images
  whatever the batch.
  """
  m = config.model
  m.num_classes = 5
  m.backbone.update(depth=18, base_width=16, frozen_stages=-1, norm_eval=False, pretrained='')
  m.neck.update(in_channels=(16, 32, 64, 128), out_channels=64, num_outs=3)
  m.head.update(feat_channels=64, num_convs=2, strides=(8, 16, 32))
  if 'gn_groups' in m.head:
    m.head.gn_groups = 16
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
  config.work_dir = f'work_dirs/{name}_smoke'
  config.results_row = dict(network=network, dataset='shapes', backbone='R-18/4', style=style,
                            lr_schd='smoke')
  return config
