"""The jitted steps of a detector, for `jax.pmap` over the local devices (axis name 'batch').

`train_step` (one SGD/AdamW update), `val_step` (losses, no update: mmdetection's 'val' workflow
phase) and `predict_step` (detections in original-image pixels). They see pmap only through the
axis name passed to the loss for its cross-device normalisers and to the gradient mean, so a
jit + sharding version is a small change. Images arrive as uint8 and are normalised here, on the
device (padded pixels become 0, as in mmdetection).
"""
import jax
import jax.numpy as jnp
import optax

from jaxdet.ops.image import normalize_images

AXIS = 'batch'


def _images(batch, pipeline, dtype):
  return normalize_images(batch['image'], batch['img_shape'], mean=tuple(pipeline.mean),
                          std=tuple(pipeline.std), to_bgr=pipeline.to_bgr, dtype=dtype)


def _total(losses):
  return sum(v for k, v in losses.items() if k.startswith('loss_'))


def train_step(state, batch, *, detector, tx, pipeline, dtype, axis_name=AXIS):
  """One optimisation step on one device's share of the batch (run under pmap)."""

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state['batch_stats']}
    outputs, mutated = detector.module.apply(variables, _images(batch, pipeline, dtype),
                                             train=True, mutable=['batch_stats'])
    losses = detector.loss(outputs, batch, axis_name=axis_name)
    return _total(losses), (losses, mutated)

  (loss, (losses, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = dict(step=state['step'] + 1, params=optax.apply_updates(state['params'], updates),
                   batch_stats=jax.lax.pmean(mutated.get('batch_stats', {}), axis_name),
                   opt_state=opt_state)
  metrics = dict(losses, loss=loss, grad_norm=optax.tree.norm(grads))
  return new_state, jax.lax.pmean(metrics, axis_name)


def val_step(state, batch, *, detector, pipeline, dtype, axis_name=AXIS):
  """Losses without an update (mmdetection's 'val' workflow phase), BN in eval mode."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  outputs = detector.module.apply(variables, _images(batch, pipeline, dtype), train=False)
  batch = dict(batch, pad_shape=jnp.where(batch['image_valid'][:, None], batch['pad_shape'], 0))
  losses = detector.loss(outputs, batch, axis_name=axis_name)
  return jax.lax.pmean(dict(losses, loss=_total(losses)), axis_name)


def predict_step(state, batch, *, detector, pipeline, dtype):
  """Detections of one device's images, boxes in original pixels (fixed size + valid mask)."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  outputs = detector.module.apply(variables, _images(batch, pipeline, dtype), train=False)
  return detector.predict(outputs, batch)
