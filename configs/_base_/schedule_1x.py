"""mmdetection's 1x schedule: 12 epochs, LR x0.1 at epochs 8 and 11, linear warmup 500 iters."""
import ml_collections


def get_config(epochs=12, milestones=(8, 11)):
  return ml_collections.ConfigDict(dict(
      epochs=epochs,
      warmup='linear',        # 'linear' | 'constant' | None  (mmengine LinearLR / ConstantLR)
      warmup_iters=500,
      warmup_ratio=0.001,
      policy='step',          # 'step' (MultiStepLR by epoch) | 'cosine' | None
      milestones=milestones,
      gamma=0.1,
      min_lr_ratio=0.0,
  ))


def sgd(base_lr=0.01, weight_decay=1e-4):
  """SGD as mmdetection's default optim_wrapper; `base_lr` is for a global batch of `base_batch`."""
  return ml_collections.ConfigDict(dict(
      name='sgd', base_lr=base_lr, base_batch=16, momentum=0.9, weight_decay=weight_decay,
      grad_clip=ml_collections.config_dict.placeholder(float),
      paramwise=dict(bias_lr_mult=1.0, bias_decay_mult=1.0, norm_decay_mult=1.0),
  ))
