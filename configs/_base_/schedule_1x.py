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

