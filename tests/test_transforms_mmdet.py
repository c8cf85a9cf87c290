"""jaxdet's transforms against mmdetection 3.3's own, with the same random draws.

Both draw from a ``RandomState`` seeded alike (mmdet from the global ``np.random``), so the
decisions are identical and boxes / labels must agree exactly. Images agree exactly except
after a resize (Pillow vs OpenCV bilinear: within 1 grey level when enlarging) and after the
photometric distortion (float rounding of the HSV formulas).
"""
import numpy as np
import pytest

from jaxdet.data import transforms as T

import mmdet_compat

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def mm():
  pytest.importorskip("torch")
  mmdet_compat.stub_compiled_ops()
  from mmcv.transforms import Compose, RandomChoice, RandomChoiceResize  # pylint: disable=import-outside-toplevel
  import mmdet.datasets.transforms as mt  # pylint: disable=import-outside-toplevel
  from mmdet.structures.bbox import HorizontalBoxes  # pylint: disable=import-outside-toplevel
  return dict(mt=mt, Boxes=HorizontalBoxes, Compose=Compose, RandomChoice=RandomChoice,
              RandomChoiceResize=RandomChoiceResize)


def _record(seed, h=120, w=160, n=6):
  r = np.random.default_rng(seed)
  xy = r.uniform(0, [w * 0.7, h * 0.7], (n, 2))
  wh = r.uniform(4, [w * 0.5, h * 0.5], (n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
  return dict(image=r.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes=boxes,
              labels=np.arange(n, dtype=np.int32), crowd=np.zeros(n, bool), image_id=1,
              orig_size=(h, w))


def _run_both(mm, mine, theirs, rec, seed):
  results = dict(img=rec["image"][..., ::-1].copy(), img_shape=rec["image"].shape[:2],
                 ori_shape=rec["image"].shape[:2], gt_bboxes=mm["Boxes"](rec["boxes"].copy()),
                 gt_bboxes_labels=rec["labels"].copy(), gt_ignore_flags=rec["crowd"].copy())
  np.random.seed(seed)
  ref = theirs(results)
  out = mine(T.make_sample(rec), np.random.RandomState(seed))
  return out, ref


def _check(out, ref, img_atol, meta=True):
  np.testing.assert_allclose(out["boxes"], ref["gt_bboxes"].numpy(), atol=1e-4)
  np.testing.assert_array_equal(out["labels"], ref["gt_bboxes_labels"])
  ref_img = ref["img"][..., ::-1].astype(np.float32)
  assert out["image"].shape == ref_img.shape
  np.testing.assert_allclose(out["image"].astype(np.float32), ref_img, atol=img_atol)
  # mmdet's scale_factor is that of the last Resize only; jaxdet's composes all of them
  # (so that boxes map back), hence compared for single transforms.
  if meta and "scale_factor" in ref:
    np.testing.assert_allclose(T.sample_meta(out)["scale_factor"], ref["scale_factor"],
                               rtol=1e-6)
  if "flip" in ref:
    assert T.sample_meta(out)["flip"] == ref["flip"]


CASES = {
    "flip": (lambda mm: T.RandomFlip(0.5), lambda mm: mm["mt"].RandomFlip(prob=0.5), 0),
    "expand": (lambda mm: T.Expand((123.675, 116.28, 103.53)),
               lambda mm: mm["mt"].Expand(mean=(123.675, 116.28, 103.53), to_rgb=True), 0),
    "min_iou_crop": (lambda mm: T.MinIoURandomCrop(), lambda mm: mm["mt"].MinIoURandomCrop(), 0),
    "random_crop": (lambda mm: T.RandomCrop((40, 100)),
                    lambda mm: mm["mt"].RandomCrop(crop_type="absolute_range",
                                                   crop_size=(40, 100),
                                                   allow_negative_crop=True), 0),
    "resize_keep_ratio": (lambda mm: T.Resize((1333, 800)),
                          lambda mm: mm["mt"].Resize(scale=(1333, 800), keep_ratio=True), 1),
    "resize_keep_ratio_cv2": (lambda mm: T.Resize((1333, 800), backend="cv2"),
                              lambda mm: mm["mt"].Resize(scale=(1333, 800), keep_ratio=True), 0),
    "resize_300": (lambda mm: T.Resize((300, 300), keep_ratio=False),
                   lambda mm: mm["mt"].Resize(scale=(300, 300), keep_ratio=False), 1),
    "resize_shrink_cv2": (lambda mm: T.Resize((100, 50), keep_ratio=False, backend="cv2"),
                          lambda mm: mm["mt"].Resize(scale=(100, 50), keep_ratio=False), 0),
    "multiscale": (lambda mm: T.RandomChoiceResize([(1333, 640), (1333, 800)]),
                   lambda mm: mm["RandomChoiceResize"](scales=[(1333, 640), (1333, 800)],
                                                       keep_ratio=True,
                                                       resize_type="mmdet.Resize"), 1),
    "photometric": (lambda mm: T.PhotoMetricDistortion(out_uint8=False),
                    lambda mm: mm["mt"].PhotoMetricDistortion(), 1e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_transform_matches_mmdet(mm, name):
  make_mine, make_theirs, img_atol = CASES[name]
  mine, theirs = make_mine(mm), make_theirs(mm)
  changed = 0
  for seed in range(25):
    rec = _record(seed)
    out, ref = _run_both(mm, mine, theirs, rec, seed)
    _check(out, ref, img_atol)
    changed += not (np.array_equal(out["boxes"], rec["boxes"]) and
                    out["image"].shape == rec["image"].shape and
                    np.array_equal(out["image"], rec["image"]))
  assert changed >= 5  # the random branches were exercised


def test_ssd_pipeline_matches_mmdet(mm):
  mt = mm["mt"]
  theirs = mm["Compose"]([
      mt.Expand(mean=(123.675, 116.28, 103.53), to_rgb=True, ratio_range=(1, 4)),
      mt.MinIoURandomCrop(min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3),
      mt.Resize(scale=(300, 300), keep_ratio=False),
      mt.RandomFlip(prob=0.5)])
  mine = T.build_train_transform(dict(kind="ssd", resize_backend="cv2"), (300, 300))
  mine.transforms = mine.transforms[:-1]  # photometric compared alone (float images)
  for seed in range(20):
    out, ref = _run_both(mm, mine, theirs, _record(seed), seed)
    _check(out, ref, img_atol=0, meta=False)


def test_detr_pipeline_matches_mmdet(mm):
  rcr = mm["RandomChoiceResize"]
  multi = [(s, 1333) for s in range(480, 801, 32)]
  theirs = mm["Compose"]([
      mm["mt"].RandomFlip(prob=0.5),
      mm["RandomChoice"](transforms=[
          [rcr(scales=multi, keep_ratio=True, resize_type="mmdet.Resize")],
          [rcr(scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True,
               resize_type="mmdet.Resize"),
           mm["mt"].RandomCrop(crop_type="absolute_range", crop_size=(384, 600),
                               allow_negative_crop=True),
           rcr(scales=multi, keep_ratio=True, resize_type="mmdet.Resize")]])])
  mine = T.build_train_transform(dict(kind="detr", resize_backend="cv2"), (1333, 800))
  for seed in range(12):
    out, ref = _run_both(mm, mine, theirs, _record(seed, h=48, w=64), seed)
    _check(out, ref, img_atol=0, meta=False)


def test_exact_test_shapes_are_mmdets_padded_batch_shapes(mm):
  """mmdet's test Resize (1333, 800) then DetDataPreprocessor(pad_size_divisor=32) on one image:
  the batch input shape is `exact_test_shapes`'s, for landscape, portrait and extreme images."""
  import torch  # pylint: disable=import-outside-toplevel
  from mmdet.models.data_preprocessors import DetDataPreprocessor  # pylint: disable=import-outside-toplevel
  from mmdet.structures import DetDataSample  # pylint: disable=import-outside-toplevel
  pre = DetDataPreprocessor(pad_size_divisor=32)
  resize = mm["mt"].Resize(scale=(1333, 800), keep_ratio=True)
  sizes = [(800, 1216), (608, 1000), (480, 1000), (1000, 700), (427, 640), (375, 500), (50, 900),
           (900, 50), (333, 333), (1200, 1800)]
  got = T.exact_test_shapes(T.eval_resize(dict(kind="standard"), (1333, 800)), 32,
                            [h for h, _ in sizes], [w for _, w in sizes])
  for (h, w), shape in zip(sizes, got):
    img = resize(dict(img=np.zeros((h, w, 3), np.uint8)))["img"]
    sample = DetDataSample(metainfo=dict(img_shape=img.shape[:2]))
    batch = pre(dict(inputs=[torch.from_numpy(img.transpose(2, 0, 1).copy())],
                     data_samples=[sample]), training=False)
    assert tuple(batch["inputs"].shape[2:]) == tuple(shape), (h, w)
    assert tuple(batch["data_samples"][0].batch_input_shape) == tuple(shape)
