"""The transform chains a config asks for (`data.pipeline`), and the normalisation presets."""
from jaxdet.data.transforms.compose import Compose, RandomChoice
from jaxdet.data.transforms.detr import RandomCrop, detr_scales
from jaxdet.data.transforms.geometric import RandomChoiceResize, RandomFlip, Resize
from jaxdet.data.transforms.photometric import PhotoMetricDistortion
from jaxdet.data.transforms.ssd import Expand, MinIoURandomCrop

PYTORCH_NORM = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), to_bgr=False)
CAFFE_NORM = dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_bgr=True)


def build_train_transform(pipeline, img_scale):
  """The training transform chain for ``data.pipeline`` (a ConfigDict / dict).

  kinds:
    'standard': Resize keep-ratio to ``img_scale`` (or RandomChoiceResize over
      ``pipeline.multiscale``), RandomFlip(flip_ratio). mmdetection's default detectors.
    'ssd': Expand(mean, expand_ratio), MinIoURandomCrop(min_ious, min_crop_size), Resize to
      ``img_scale`` without keeping ratio, RandomFlip, PhotoMetricDistortion.
    'detr': RandomFlip, then either RandomChoiceResize(short sides ``detr_short_sides``, max
      ``detr_max_size``) or [RandomChoiceResize(``detr_crop_short_sides``), RandomCrop
      (``detr_crop_size``), the same multi-scale resize].
  """
  kind = pipeline.get("kind", "standard")
  flip = RandomFlip(pipeline.get("flip_ratio", 0.5))
  keep_ratio = pipeline.get("keep_ratio", True)
  be = pipeline.get("resize_backend", "pillow")
  if kind == "standard":
    scales = [tuple(s) for s in (pipeline.get("multiscale") or ())]
    resize = (RandomChoiceResize(scales, keep_ratio, be) if scales
              else Resize(img_scale, keep_ratio, be))
    return Compose([resize, flip])
  if kind == "ssd":
    return Compose([
        Expand(pipeline.get("mean", PYTORCH_NORM["mean"]),
               pipeline.get("expand_ratio", (1, 4))),
        MinIoURandomCrop(pipeline.get("min_ious", (0.1, 0.3, 0.5, 0.7, 0.9)),
                         pipeline.get("min_crop_size", 0.3)),
        Resize(img_scale, keep_ratio=False, backend=be),
        flip,
        PhotoMetricDistortion(out_uint8=pipeline.get("photometric_uint8", True)),
    ])
  if kind == "detr":
    max_size = pipeline.get("detr_max_size", 1333)
    multi = RandomChoiceResize(detr_scales(
        pipeline.get("detr_short_sides", range(480, 801, 32)), max_size), backend=be)
    crop_resize = RandomChoiceResize(detr_scales(
        pipeline.get("detr_crop_short_sides", (400, 500, 600)), max_size), backend=be)
    return Compose([flip, RandomChoice([
        [multi],
        [crop_resize, RandomCrop(pipeline.get("detr_crop_size", (384, 600))), multi]])])
  raise ValueError(f"data.pipeline.kind must be 'standard', 'ssd' or 'detr', got {kind!r}")


def eval_resize(pipeline, img_scale):
  """The test-time `Resize` to ``img_scale``: keep-ratio unless ``kind == 'ssd'`` (or
  ``keep_ratio`` is False)."""
  kind = pipeline.get("kind", "standard")
  if kind not in ("standard", "ssd", "detr"):
    raise ValueError(f"data.pipeline.kind must be 'standard', 'ssd' or 'detr', got {kind!r}")
  keep_ratio = kind != "ssd" and pipeline.get("keep_ratio", True)
  return Resize(img_scale, keep_ratio, pipeline.get("resize_backend", "pillow"))


def build_test_transform(pipeline, img_scale):
  """Test-time chain: one Resize to ``img_scale`` (`eval_resize`)."""
  return Compose([eval_resize(pipeline, img_scale)])
