"""Training and test transforms with mmdetection 3.3 semantics (numpy, on the host).

Files: `sample` (the sample dict), `geometric` (resize, flip, crop), `ssd` (Expand,
MinIoURandomCrop), `photometric` (PhotoMetricDistortion), `detr` (RandomCrop), `compose`,
`padding` (buckets, size divisor), `build` (the chains a config asks for). Every name is
importable from here: ``from jaxdet.data import transforms as T; T.Resize(...)``.

A *sample* is a plain dict that flows through the transforms::

  image:    (h, w, 3) uint8 RGB (float32 after a float PhotoMetricDistortion)
  boxes:    (n, 4) float32, xyxy in pixels of the current image
  labels:   (n,) int32 in 0..K-1
  crowd:    (n,) bool; crowd boxes ride along (MinIoURandomCrop looks at them, as mmdet's
            ignored boxes) and are dropped as targets at the end (`training_targets`)
  image_id: int;  orig_size: (h, w) of the decoded file
  affine:   (2, 2) float64 [[ax, bx], [ay, by]]: a point x of the original image sits at
            ``ax * x + bx`` of the current image (ax < 0 after a horizontal flip)

Each transform is a small class called as ``t(sample, rng) -> sample`` where ``rng`` is a
``np.random.RandomState``. They draw random numbers in exactly the order and from exactly the
distributions mmdetection / mmcv draw them from the global ``np.random`` state, so seeding both
with the same value gives the same decisions (the mmdet comparison tests rely on this).

Image resizing uses Pillow's bilinear filter by default (mmdet uses OpenCV's): sizes, scale
factors and boxes are identical; pixel values agree within 1 grey level when enlarging, while
Pillow antialiases when shrinking (SSD's 300 x 300). ``resize_backend='cv2'`` reproduces
mmdetection's pixels exactly where OpenCV is installed.

Normalisation is meant to run on the device (`normalize_images`): batches stay uint8 (4x less
host->device traffic) and the padded pixels are 0 after normalisation, as in mmdetection,
which pads after normalising.
"""

# pylint: disable=unused-import
from jaxdet.data.transforms.build import (CAFFE_NORM, PYTORCH_NORM, build_test_transform,
                                          build_train_transform, eval_resize)
from jaxdet.data.transforms.compose import Compose, RandomChoice
from jaxdet.data.transforms.detr import RandomCrop, detr_scales
from jaxdet.data.transforms.geometric import (RandomChoiceResize, RandomFlip, Resize, crop,
                                              flip_horizontal, rescale_size, resize_image,
                                              resize_to)
from jaxdet.data.transforms.padding import (bucket_shapes, ceil_to, choose_bucket,
                                            exact_test_shapes, fit_into, pad_to_multiple,
                                            possible_test_shapes)
from jaxdet.data.transforms.photometric import PhotoMetricDistortion, hsv_to_rgb, rgb_to_hsv
from jaxdet.data.transforms.sample import (make_sample, sample_meta, scale_affine, select_boxes,
                                           shift_affine, training_targets)
from jaxdet.data.transforms.ssd import Expand, MinIoURandomCrop
from jaxdet.ops.boxes import boxes_to_original  # noqa: F401  (re-exported)
from jaxdet.ops.image import normalize_images  # noqa: F401  (re-exported)
