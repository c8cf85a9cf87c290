"""ATSS R101-FPN 1x on COCO (mmdetection's `atss_r101_fpn_1x_coco`: 41.5 box AP).

  python -m jaxdet.train --config configs/atss_r101.py --workdir work_dirs/atss_r101 \
      --config.data.train.ann_file=... (as configs/atss.py)
The backbone starts from torchvision's ImageNet ResNet-101 ('torchvision://resnet101'), read from
checkpoints/resnet101-63fe2227.pth at init (nothing is downloaded at run time); get it once:
  mkdir -p checkpoints && wget -P checkpoints https://download.pytorch.org/models/resnet101-63fe2227.pth
"""
from configs import atss


def get_config(arg=None):
  config = atss.get_config(arg)
  if arg != 'smoke':
    config.model.backbone.depth = 101
    config.model.backbone.pretrained = 'checkpoints/resnet101-63fe2227.pth'
    config.work_dir = 'work_dirs/atss_r101_fpn_1x_coco'
    config.results_row.backbone = 'R-101'
  return config
