"""mmdetection's DETR R50 model (`configs/detr/detr_r50_8xb2-150e_coco.py`, model part).

ResNet-50 (pytorch style, C5 only, stem + stage 1 frozen, BN frozen: eval statistics and
requires_grad=False), `ChannelMapper` 1x1 conv 2048 -> 256 with bias, then the DETR head of
`jaxdet/models/heads/detr_head.py` (6 + 6 post-norm transformer layers, 8 heads, FFN 2048,
dropout 0.1, 100 queries, sine positional encoding) and its loss (`detr_loss.py`: Hungarian
matching with costs 1 / 5 / 2, CE with no-object weight 0.1, L1 x5, GIoU x2, every decoder
layer). 41,575,061 parameters, 41,299,541 of them trainable.
"""
import ml_collections


def get_config(num_classes=80):
  return ml_collections.ConfigDict(dict(
      type='detr',
      num_classes=num_classes,
      backbone=dict(type='resnet', depth=50, style='pytorch', out_indices=(3,),
                    frozen_stages=1, norm_eval=True, norm_trainable=False, base_width=64,
                    pretrained=''),  # torchvision ResNet-50 ImageNet weights (.pth), see README
      neck=dict(type='channel_mapper', in_channels=(2048,), out_channels=256, kernel_size=1),
      head=dict(embed_dims=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                feedforward_channels=2048, dropout=0.1,
                num_queries=100,                 # more real gts in an image stay unmatched
                pos_temperature=10000.,
                bg_cls_weight=0.1, loss_cls_weight=1.0, loss_bbox_weight=5.0,
                loss_iou_weight=2.0,
                match_cls_weight=1.0, match_bbox_weight=5.0, match_iou_weight=2.0,
                # jaxdet.assigners.hungarian_match: 'auto' = scipy on the host when compiled for
                # CPU, the on-device solver on GPU / TPU; 'device' | 'host' force one.
                match_method='auto'),
      # no score threshold in DETR's prediction (mmdetection keeps the top 100); score_thr is only
      # jaxdet.Detector's default display filter
      test_cfg=dict(max_per_img=100, score_thr=0.0),
  ))
