"""mmdetection's NAS-FCOS R50-caffe model (`nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py`,
model part) and its input normalisation (`caffe_pipeline`)."""
import ml_collections

# Registers 'nasfcos_fpn' (NECKS) and 'nas_fcos' (HEADS) for every entry point that loads this
# config, also before jaxdet.models.detectors imports them itself.
import jaxdet.models.heads.nasfcos_head  # noqa: F401  pylint: disable=unused-import
import jaxdet.models.necks.nasfcos_fpn  # noqa: F401  pylint: disable=unused-import

INF = 1e8  # mmdetection's fcos_head.INF: the open end of the last regress range


def get_config(num_classes=80):
  return ml_collections.ConfigDict(dict(
      type='nas_fcos',
      num_classes=num_classes,
      # Caffe ResNet-50 (detectron2's MSRA weights): stride 2 in the first 1x1 conv of a block;
      # BN eps 0, frozen (requires_grad=False: no gradient, no update, no decay), eval mode.
      backbone=dict(type='resnet', depth=50, style='caffe', out_indices=(0, 1, 2, 3),
                    frozen_stages=1, norm_eval=True, norm_trainable=False, bn_eps=0.0,
                    base_width=64,
                    # mmdetection's 'open-mmlab://detectron2/resnet50_caffe', read at init; see
                    # configs/nas_fcos.py for the download. '' trains the backbone from scratch.
                    pretrained='checkpoints/resnet50_msra-5891d200.pth'),
      # NASFCOS_FPN: C3-C5 adapted to 256 channels, 7 searched ConcatCells (DCNv2 input convs,
      # deform_groups 2, BatchNorm trained), P3-P5 + 2 stride-2 extra convs (add_extra_convs).
      neck=dict(type='nasfcos_fpn', in_channels=(256, 512, 1024, 2048), out_channels=256,
                start_level=1, add_extra_convs=True, num_outs=5, deform_groups=2),
      # NASFCOSHead: the searched tower (dconv3x3, conv3x3, dconv3x3, conv1x1; GN 32) on
      # FCOSHead's defaults: assignment, focal + IoU (log) + centerness BCE, prediction.
      head=dict(feat_channels=256, gn_groups=32, deform_groups=2,
                strides=(8, 16, 32, 64, 128),
                regress_ranges=((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)),
                centerness_on_reg=False, center_sampling=False, center_sample_radius=1.5,
                norm_on_bbox=False,
                focal_alpha=0.25, focal_gamma=2.0, loss_cls_weight=1.0,
                loss_bbox_weight=1.0, loss_centerness_weight=1.0),
      test_cfg=dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.6, max_per_img=100,
                    min_bbox_size=0.0),
  ))


def caffe_pipeline(pipeline):
  """NAS-FCOS's data_preprocessor on `config.data.pipeline`: BGR input (mmdetection decodes BGR
  and does not swap; jaxdet decodes RGB, so it swaps), mean (103.53, 116.28, 123.675), std 1."""
  pipeline.update(mean=(103.53, 116.28, 123.675), std=(1.0, 1.0, 1.0), to_bgr=True)
  return pipeline
