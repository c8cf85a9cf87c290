"""mmdetection's ATSS R50-FPN model (`atss_r50_fpn_1x_coco.py`, model part), and its smoke size."""
import ml_collections

from configs._base_ import resnet_fpn


def get_config(num_classes=80):
  return ml_collections.ConfigDict(dict(
      type='atss',
      num_classes=num_classes,
      backbone=dict(type='resnet', depth=50, style='pytorch', out_indices=(0, 1, 2, 3),
                    frozen_stages=1, norm_eval=True, base_width=64,
                    # torchvision's ResNet-50 ImageNet weights (mmdetection's
                    # 'torchvision://resnet50'), read at init; see configs/atss.py for the
                    # download. '' trains the backbone from scratch.
                    pretrained='checkpoints/resnet50-0676ba61.pth'),
      neck=dict(type='fpn', in_channels=(256, 512, 1024, 2048), out_channels=256, start_level=1,
                add_extra_convs='on_output', relu_before_extra_convs=False, num_outs=5),
      head=dict(feat_channels=256, num_convs=4, gn_groups=32,
                strides=(8, 16, 32, 64, 128), octave_base_scale=8, scales_per_octave=1,
                target_stds=(0.1, 0.1, 0.2, 0.2), topk=9,
                focal_alpha=0.25, focal_gamma=2.0, loss_cls_weight=1.0,
                loss_bbox_weight=2.0, loss_centerness_weight=1.0),
      test_cfg=dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.6, max_per_img=100,
                    min_bbox_size=0.0),
  ))


def small(model):
  """The smoke model: `resnet_fpn.small`, anchors halved (octave_base_scale 4) for the shapes'
  8-96 px objects in 160 px images."""
  resnet_fpn.small(model)
  model.head.octave_base_scale = 4
  return model
