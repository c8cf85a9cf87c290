"""ATSS R101-FPN 1x on COCO (mmdetection's `atss_r101_fpn_1x_coco`: 41.5 box AP).

  python -m jaxdet.train --config configs/atss_r101.py --workdir work_dirs/atss_r101 \
      --config.data.train.ann_file=... (as configs/atss.py) \
      --config.model.backbone.pretrained=checkpoints/resnet101-63fe2227.pth
"""
from configs import atss


def get_config(arg=None):
  config = atss.get_config(arg)
  if arg != 'smoke':
    config.model.backbone.depth = 101
    config.work_dir = 'work_dirs/atss_r101_fpn_1x_coco'
    config.results_row.backbone = 'R-101'
  return config
