"""SSD512 VGG16 on COCO (mmdetection's `ssd512_coco`: 29.5 box AP after 120 epochs).

The SSD300 recipe (configs/ssd300.py: data, 5x repeated dataset, SGD 2e-3 for 64 images, 24
epochs with steps at 16 and 22) at 512x512, with SSD512's neck (one more extra level, last
kernel 4) and anchors (basesize ratio 0.1-0.9, strides 8..512): 36,038,196 parameters.
  python -m jaxdet.train --config configs/ssd512.py --workdir work_dirs/ssd512 \
      --config.data.train.ann_file=data/coco/annotations/instances_train2017.json \
      --config.data.train.img_dir=data/coco/train2017 \
      --config.data.val.ann_file=data/coco/annotations/instances_val2017.json \
      --config.data.val.img_dir=data/coco/val2017
  python -m jaxdet.convert --config configs/ssd512.py --from-mmdet ssd512_coco.pth \
      --out work_dirs/ssd512_mmdet
"""
from configs import ssd300


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/ssd512.py: unknown argument {arg!r} (its smoke run is "
                     "configs/ssd300.py:smoke)")
  config = ssd300.base_config(input_size=512)
  config.work_dir = 'work_dirs/ssd512_coco'
  config.results_row = dict(network='SSD512', dataset='COCO', backbone='VGG16', style='caffe',
                            lr_schd='120e')
  return config
