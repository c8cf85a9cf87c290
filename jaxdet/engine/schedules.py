"""Learning-rate schedules with mmengine's semantics, as optax schedules of the step (0-based).

mmdetection composes a warmup over iterations with a per-epoch decay; the factors multiply:
  lr(step) = lr * warmup(step) * decay(step)
- warmup 'linear' (mmengine LinearLR, start_factor=ratio, end=iters): the factor rises linearly from
  `ratio` at step 0 to 1 at step `iters - 1`, then stays 1.
- warmup 'constant' (ConstantLR, factor=ratio, end=iters): `ratio` for steps 0..iters-2, then 1.
- decay 'step' (MultiStepLR, by epoch): multiplied by gamma at every milestone epoch passed.
- decay 'cosine' (CosineAnnealingLR over the whole run): down to `min_lr_ratio` at the last step.
"""
import jax.numpy as jnp


def warmup_factor(step, *, kind, iters, ratio):
  """Multiplier in (0, 1] at `step` for mmengine's LinearLR / ConstantLR warmups."""
  if kind is None or kind == 'none' or iters <= 0:
    return jnp.ones_like(step, dtype=jnp.float32)
  last = max(iters - 1, 1)  # mmengine: total_iters = end - begin - 1
  step = jnp.asarray(step, jnp.float32)
  if kind == 'linear':
    return jnp.where(step < last, ratio + (1.0 - ratio) * step / last, 1.0)
  if kind == 'constant':
    return jnp.where(step < last, ratio, 1.0)
  raise ValueError(f"schedule.warmup={kind!r} must be 'linear', 'constant' or None")


def decay_factor(step, *, kind, steps_per_epoch, total_steps, milestones=(), gamma=0.1,
                 min_lr_ratio=0.0):
  """Multiplier at `step` for the per-epoch step decay or a cosine decay over the run."""
  step = jnp.asarray(step, jnp.float32)
  if kind == 'step':
    epoch = jnp.floor(step / steps_per_epoch)
    passed = sum((epoch >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
    return jnp.asarray(gamma, jnp.float32) ** passed
  if kind == 'cosine':
    t = jnp.clip(step / max(total_steps - 1, 1), 0.0, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  if kind is None or kind == 'none':
    return jnp.ones_like(step)
  raise ValueError(f"schedule.policy={kind!r} must be 'step', 'cosine' or None")


def build_schedule(lr, schedule_config, *, steps_per_epoch):
  """optax-style schedule `step -> lr` from `config.schedule` (keys: epochs, warmup, warmup_iters,
  warmup_ratio, policy, milestones, gamma, min_lr_ratio); `lr` already scaled to the global batch."""
  c = schedule_config
  total_steps = int(c.epochs * steps_per_epoch)

  def schedule(step):
    w = warmup_factor(step, kind=c.warmup, iters=c.warmup_iters, ratio=c.warmup_ratio)
    d = decay_factor(step, kind=c.policy, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, milestones=tuple(c.get('milestones', ())),
                     gamma=c.get('gamma', 0.1), min_lr_ratio=c.get('min_lr_ratio', 0.0))
    return lr * w * d

  return schedule
