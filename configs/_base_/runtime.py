"""Runtime defaults: seed, logging, checkpoints, workflow and evaluation cadence.

Checkpoints (`work_dir/checkpoints/<step>/`, written in the background by orbax, atomically: a
run killed at any moment resumes from its last complete one, with the same command):
  checkpoint_interval        epochs between checkpoints at epoch ends (and always at the end)
  checkpoint_every_steps     also every N steps (mid-epoch too); 0 or None: off
  checkpoint_every_minutes   also when M minutes have passed since the last save; 0 or None: off.
                             Default 30: a crash loses at most ~30 minutes, not a COCO epoch
                             (~7,300 steps at batch 16). Smoke runs set 0 (every epoch only).
  max_to_keep                the newest N checkpoints of any kind are kept (None: all)
A SIGTERM / Ctrl-C saves the current step first and waits until it is on disk.
"""
import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      seed=0,
      work_dir='work_dirs/default',
      log_interval=50,            # steps between log lines
      checkpoint_interval=1,      # epochs between checkpoints (and at the end)
      checkpoint_every_steps=0,   # also every N steps, mid-epoch included (0/None: off)
      checkpoint_every_minutes=30.0,  # also after M minutes since the last save (0/None: off)
      max_to_keep=3,              # newest checkpoints kept, epoch and step ones alike
      eval_interval=1,            # epochs between COCO evaluations (and at the end)
      workflow=(('train', 1), ('val', 1)),  # mmdetection's: a val-loss pass after each train epoch
      max_steps=ml_collections.config_dict.placeholder(int),  # stop early (e.g. smoke runs)
      dtype='float32',            # 'bfloat16' computes in bf16 with float32 params and losses
      load_from='',               # a jaxdet checkpoint to fine-tune from (not a resume)
      distributed=False,          # multi-host: call jax.distributed.initialize() first
      cpu_devices=1,              # on a CPU host: split it into N XLA devices, samples_per_gpu
                                  # shared among them (jaxdet/engine/cpu_devices.py)
      # XLA:CPU flags the commands add to XLA_FLAGS before JAX starts ('' for XLA's defaults;
      # jaxdet/engine/xla_cpu_flags.py)
      xla_cpu_flags=('--xla_cpu_experimental_ynn_fusion_type=reduce '
                     '--xla_cpu_enable_concurrency_optimized_scheduler=false'),
  ))
