"""The small ResNet + FPN + dense head that the one-stage detectors' smoke runs use."""


def small(model):
  """`config.model` of a ResNet-FPN detector made small, in place: ResNet-18 at quarter width
  trained whole (no pretrained weights: no frozen stage, BN with batch statistics), a 64-channel
  FPN over P3-P5, a 2-conv 64-channel head (GroupNorm with 16 groups where it has GN)."""
  model.backbone.update(depth=18, base_width=16, frozen_stages=-1, norm_eval=False, pretrained='')
  model.neck.update(in_channels=(16, 32, 64, 128), out_channels=64, num_outs=3)
  model.head.update(feat_channels=64, num_convs=2, strides=(8, 16, 32))
  if 'gn_groups' in model.head:
    model.head.gn_groups = 16
  return model
