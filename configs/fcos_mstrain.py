"""FCOS R50-caffe FPN GN-head, multi-scale training, 2x on COCO (mmdetection's
`fcos_r50-caffe_fpn_gn-head_ms-640-800-2x_coco`: 38.5 box AP).

  python -m jaxdet.train --config configs/fcos_mstrain.py --workdir work_dirs/fcos_r50_caffe_ms \
      --config.data.train.ann_file=... (as configs/fcos.py)
The model, optimizer and pretrained weights are configs/fcos.py's. Training resizes each image to
one of the scales (1333, 640) and (1333, 800) chosen at random (mmdetection's RandomChoiceResize,
keep ratio); the batches are padded into the buckets of the larger scale (800 x 1344 and
1344 x 800), so one program per orientation. Testing at (1333, 800). 24 epochs, LR x0.1 at
epochs 16 and 22.
Smoke (configs/fcos.py's, with the scales 128 and 160 px in one 160 x 160 bucket; checked to
run, not timed to a target):
  python -m jaxdet.train --config configs/fcos_mstrain.py:smoke
"""
from configs import fcos


def get_config(arg=None):
  config = fcos.get_config()
  config.data.pipeline.multiscale = ((1333, 640), (1333, 800))
  config.schedule.update(epochs=24, milestones=(16, 22))
  config.work_dir = 'work_dirs/fcos_r50-caffe_fpn_gn-head_ms-640-800-2x_coco'
  config.results_row.lr_schd = '2x'
  if arg == 'smoke':
    fcos.smoke(config)
    config.data.pipeline.multiscale = ((160, 128), (160, 160))
    config.work_dir = 'work_dirs/fcos_mstrain_smoke'
    config.results_row.update(lr_schd='smoke-ms')
  elif arg:
    raise ValueError(f"configs/fcos_mstrain.py: unknown argument {arg!r} (have: 'smoke')")
  return config
