"""mmdetection's SSD300 VGG16 model (`_base_/models/ssd300.py`, model part), and SSD512's changes
(`ssd/ssd512_coco.py`)."""
import ml_collections


def get_config(num_classes=80):
  """SSD300: VGG16 (ceil-mode pools, conv6 dilated / conv7) + SSDNeck + SSDHead, 34,305,206
  parameters (backbone 20,483,904, neck 2,460,032, head 11,361,270)."""
  return ml_collections.ConfigDict(dict(
      type='ssd',
      num_classes=num_classes,
      backbone=dict(type='vgg', depth=16, base_width=64, with_bn=False, norm_eval=False,
                    # mmdetection's 'open-mmlab://vgg16_caffe', read at init (see
                    # configs/ssd300.py for the download); '' trains from scratch.
                    pretrained='checkpoints/vgg16_caffe-292e1171.pth'),
      neck=dict(type='ssd_neck', in_channels=(512, 1024),
                out_channels=(512, 1024, 512, 256, 256, 256),
                level_strides=(2, 2, 1, 1), level_paddings=(1, 1, 0, 0), l2_norm_scale=20.,
                last_kernel_size=3, norm='', norm_eval=False),
      head=dict(
          # SSDAnchorGenerator(scale_major=False): sizes from input_size and
          # basesize_ratio_range, unless min_sizes / max_sizes (pixels per level) are given.
          input_size=300, basesize_ratio_range=(0.15, 0.9), strides=(8, 16, 32, 64, 100, 300),
          ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), min_sizes=(), max_sizes=(),
          target_means=(0., 0., 0., 0.), target_stds=(0.1, 0.1, 0.2, 0.2),
          pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., gt_max_assign_all=False,
          neg_pos_ratio=3, smoothl1_beta=1.0,
          # 'device': mmdetection's normaliser, this device's positives (sum over its images of
          # max(num_pos, 1)); 'global': its mean over devices.
          avg_factor='device'),
      test_cfg=dict(nms_pre=1000, score_thr=0.02, iou_threshold=0.45, max_per_img=200,
                    min_bbox_size=0.0),
  ))


def ssd512(model):
  """SSD300's model turned into SSD512's, in place (36,038,196 parameters: neck 3,017,472,
  head 12,536,820): one more extra level, last kernel 4, anchors for 512 px."""
  model.neck.update(out_channels=(512, 1024, 512, 256, 256, 256, 256),
                    level_strides=(2, 2, 2, 2, 1), level_paddings=(1, 1, 1, 1, 1),
                    last_kernel_size=4)
  model.head.update(input_size=512, basesize_ratio_range=(0.1, 0.9),
                    strides=(8, 16, 32, 64, 128, 256, 512),
                    ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)))
  return model


def small(model, width=8):
  """The smoke model, in place: the same SSD at 160 px. VGG16 at 1/8 width with BatchNorm after
  every conv, also in the neck (`with_bn`, mmdetection's SSDNeck `norm_cfg=BN`: without pretrained
  weights the plain VGG starts with logits in the hundreds, loss 150, gradient norm 2,000, and BN
  in the VGG stages alone still diverged at lr 0.01), the L2Norm scale reduced with the width,
  five levels of 20, 10, 5, 3 and 1 cells (the 160
  px input has no room for SSD300's sixth), anchors of 16 to 160 px, 2x each level's stride as
  SSD300's 21 px at stride 8 (anchors as small as the stride left ~1 positive per object)."""
  w = width
  model.backbone.update(base_width=w, with_bn=True, pretrained='')
  # L2Norm scaled with the width, so that each conv4_3 channel keeps SSD300's size
  # (20 / sqrt(512) per channel): 20 on 64 channels started at loss 43 and diverged.
  model.neck.l2_norm_scale = round(20. * (8 * w / 512) ** 0.5, 4)
  model.neck.update(in_channels=(8 * w, 16 * w), out_channels=(8 * w, 16 * w, 8 * w, 4 * w, 4 * w),
                    level_strides=(2, 2, 1), level_paddings=(1, 1, 0), norm='bn')
  model.head.update(strides=(8, 16, 32, 53, 160), ratios=((2,), (2, 3), (2, 3), (2,), (2,)),
                    min_sizes=(16, 32, 64, 96, 128), max_sizes=(32, 64, 96, 128, 160))
  return model
