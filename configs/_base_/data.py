"""Data defaults (``config.data``): sources, mmdetection's COCO pipeline, loader settings.

The standard pipeline is mmdetection's: resize keeping the ratio to fit ``img_scale``
(w, h) = (1333, 800), flip with probability 0.5, normalise with the torchvision (pytorch-style)
mean/std, pad to a multiple of 32. Detector configs change what they need, e.g.::

  config.data.pipeline.multiscale = ((1333, 640), (1333, 800))   # FCOS ms-2x
  config.data.pipeline.update(kind='ssd', keep_ratio=False, size_divisor=1)  # with img_scale (300, 300)
  config.data.pipeline.update(kind='detr', size_divisor=1)
  config.data.pipeline.update(mean=(102.9801, 115.9465, 122.7717), std=(1., 1., 1.), to_bgr=True)  # caffe

Batches have ``samples_per_gpu`` images per device; the learning rate scales with the global
batch (see each detector config).
"""
import ml_collections


def get_config():
  data = ml_collections.ConfigDict()
  data.source = 'shapes'               # 'coco' | 'tfds' | 'shapes'
  data.train = dict(ann_file='', img_dir='')
  data.val = dict(ann_file='', img_dir='', samples_per_gpu=2)
  data.tfds = dict(name='coco/2017', data_dir='', train_split='train', val_split='validation')
  data.shapes = dict(num_train=2000, num_val=200, size=192, seed=0, cache_dir='')

  data.repeat = 1                      # passes over the data per epoch (mmdetection's RepeatDataset)
  data.samples_per_gpu = 2
  data.workers_per_gpu = 2
  data.prefetch = 2                    # batches buffered per worker
  data.max_gt = 100                    # gt rows per image; extra targets are dropped and counted
  data.skip_bad_images = False
  data.img_scale = (1333, 800)         # (w, h): long side <= 1333, short side <= 800
  data.buckets = ()                    # padded (H, W) training batch shapes (and test ones with
                                       # test_padding='buckets'); () = landscape + portrait
                                       # fitting img_scale: (800, 1344), (1344, 800)
  data.test_padding = 'exact'          # evaluation / val loss / inference: 'exact' pads each
                                       # image to a multiple of size_divisor as mmdetection
                                       # does (a converted mmdet model gives mmdet's detections;
                                       # one program per padded shape, <= 83 for (1333, 800),
                                       # ~45 s to compile each for ATSS R50 on a 2-core CPU,
                                       # cached in ~/.cache/jaxdet/xla for later runs);
                                       # 'buckets' pads into data.buckets like training: 1-2
                                       # programs, but GN heads (ATSS, FCOS) then differ from
                                       # mmdet on images that do not fill their bucket (shapes
                                       # smoke ATSS on 160 px crops: mAP 0.3261 vs 0.3268 exact;
                                       # first evaluation 199 s vs 483 s, 292 s cached)

  data.pipeline = dict(
      kind='standard',                 # 'standard' | 'ssd' | 'detr'
      keep_ratio=True,
      multiscale=(),                   # RandomChoiceResize scales ('value' mode), () = img_scale
      flip_ratio=0.5,
      size_divisor=32,                 # pad to a multiple of this (1 for SSD / DETR)
      min_box_size=1.0,                # training drops targets narrower/lower than this (px)
                                       # after the transforms (mmdet has no such filter: 0.)
      resize_backend='pillow',         # 'cv2': mmdetection's exact pixels (needs OpenCV)
      # Normalisation, applied on the device (transforms.normalize_images):
      mean=(123.675, 116.28, 103.53),
      std=(58.395, 57.12, 57.375),
      to_bgr=False,
      # SSD (kind='ssd'): Expand + MinIoURandomCrop + fixed resize + PhotoMetricDistortion
      expand_ratio=(1, 4),
      min_ious=(0.1, 0.3, 0.5, 0.7, 0.9),
      min_crop_size=0.3,
      photometric_uint8=True,          # False: mmdet's unclipped float32 images
      # DETR (kind='detr'): multi-scale resize, or resize + random crop + multi-scale resize
      detr_short_sides=tuple(range(480, 801, 32)),
      detr_max_size=1333,
      detr_crop_short_sides=(400, 500, 600),
      detr_crop_size=(384, 600),
  )
  return data
