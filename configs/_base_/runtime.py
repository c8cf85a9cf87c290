"""Runtime defaults: seed, logging, checkpoints, workflow and evaluation cadence."""
import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      seed=0,
      work_dir='work_dirs/default',
      log_interval=50,            # steps between log lines
      checkpoint_interval=1,      # epochs between checkpoints (and at the end)
      max_to_keep=3,
      eval_interval=1,            # epochs between COCO evaluations (and at the end)
      workflow=(('train', 1), ('val', 1)),  # mmdetection's: a val-loss pass after each train epoch
      max_steps=ml_collections.config_dict.placeholder(int),  # stop early (e.g. smoke runs)
      dtype='float32',            # 'bfloat16' computes in bf16 with float32 params and losses
      load_from='',               # a jaxdet checkpoint to fine-tune from (not a resume)
      distributed=False,          # multi-host: call jax.distributed.initialize() first
  ))
