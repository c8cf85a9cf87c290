"""mmdetection's FCOS R50-caffe FPN GN-head model (`fcos_r50-caffe_fpn_gn-head_1x_coco.py`, model
part), and the caffe-style input normalisation it needs (`caffe_pipeline`)."""
import ml_collections

from configs._base_ import resnet_fpn

INF = 1e8  # mmdetection's fcos_head.INF: the open end of the last regress range


def get_config(num_classes=80):
  return ml_collections.ConfigDict(dict(
      type='fcos',
      num_classes=num_classes,
      # Caffe ResNet-50 (detectron weights): stride 2 in the first 1x1 conv of a block; BN
      # frozen (requires_grad=False: no gradient, no update, no decay) and in eval mode.
      backbone=dict(type='resnet', depth=50, style='caffe', out_indices=(0, 1, 2, 3),
                    frozen_stages=1, norm_eval=True, norm_trainable=False, base_width=64,
                    # open-mmlab's caffe ResNet-50 ImageNet weights (mmdetection's
                    # 'open-mmlab://detectron/resnet50_caffe'), read at init; see configs/fcos.py
                    # for the download. '' trains the backbone from scratch.
                    pretrained='checkpoints/resnet50_caffe-788b5fa3.pth'),
      neck=dict(type='fpn', in_channels=(256, 512, 1024, 2048), out_channels=256, start_level=1,
                add_extra_convs='on_output', relu_before_extra_convs=True, num_outs=5),
      head=dict(feat_channels=256, num_convs=4, gn_groups=32,
                strides=(8, 16, 32, 64, 128),
                regress_ranges=((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)),
                centerness_on_reg=False, center_sampling=False, center_sample_radius=1.5,
                norm_on_bbox=False,
                focal_alpha=0.25, focal_gamma=2.0, loss_cls_weight=1.0,
                loss_bbox_weight=1.0, loss_centerness_weight=1.0),
      test_cfg=dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5, max_per_img=100,
                    min_bbox_size=0.0),
  ))


def caffe_pipeline(pipeline):
  """mmdetection's caffe data_preprocessor on `config.data.pipeline`: BGR input (mmdetection
  decodes BGR and does not swap; jaxdet decodes RGB, so it swaps), detectron's mean, std 1."""
  pipeline.update(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_bgr=True)
  return pipeline


def small(model):
  """The smoke model: `resnet_fpn.small` with trainable BN (no pretrained weights) and three
  levels whose regress ranges are the full model's halved (as ATSS's smoke halves its anchors),
  for the shapes' 8-96 px objects in 160 px images."""
  resnet_fpn.small(model)
  model.backbone.norm_trainable = True
  model.head.regress_ranges = ((-1, 32), (32, 64), (64, INF))
  return model
