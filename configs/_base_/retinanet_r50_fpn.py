"""mmdetection's RetinaNet R50-FPN model (`_base_/models/retinanet_r50_fpn.py`, model part), and its
smoke size."""
import ml_collections

from configs._base_ import resnet_fpn


def get_config(num_classes=80):
  return ml_collections.ConfigDict(dict(
      type='retinanet',
      num_classes=num_classes,
      backbone=dict(type='resnet', depth=50, style='pytorch', out_indices=(0, 1, 2, 3),
                    frozen_stages=1, norm_eval=True, base_width=64,
                    pretrained=''),  # torchvision ResNet-50 ImageNet weights (.pth), see README
      neck=dict(type='fpn', in_channels=(256, 512, 1024, 2048), out_channels=256, start_level=1,
                add_extra_convs='on_input', relu_before_extra_convs=False, num_outs=5),
      head=dict(feat_channels=256, num_convs=4,
                norm='', gn_groups=32,  # '' (mmdetection's RetinaHead) or 'gn' (norm_cfg GN)
                strides=(8, 16, 32, 64, 128), octave_base_scale=4, scales_per_octave=3,
                ratios=(0.5, 1.0, 2.0),
                target_means=(0., 0., 0., 0.), target_stds=(1., 1., 1., 1.),
                pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0,
                focal_alpha=0.25, focal_gamma=2.0, loss_cls_weight=1.0, loss_bbox_weight=1.0,
                # 'device': mmdetection's normaliser, this device's positives (sum over its
                # images of max(num_pos, 1)); 'global': its mean over devices (as ATSS / FCOS).
                avg_factor='device'),
      test_cfg=dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5, max_per_img=100,
                    min_bbox_size=0.0),
  ))


def small(model):
  """The smoke model: `resnet_fpn.small`, anchors octave_base_scale 2 (16-25 px at stride 8 ...
  64-101 px at stride 32) for the shapes' 8-96 px objects, and GroupNorm in the head towers
  (mmdetection's `norm_cfg=dict(type='GN')`): without pretrained weights the unnormalised head
  kept its classifier at the prior for ~400 steps (experiments/README.md)."""
  resnet_fpn.small(model)
  model.head.update(norm='gn', octave_base_scale=2)
  return model
