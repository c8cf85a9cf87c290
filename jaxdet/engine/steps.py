"""The jitted steps of a detector, for `jax.pmap` over the local devices (axis name 'batch').

`train_step` (one SGD/AdamW update), `val_step` (losses, no update: mmdetection's 'val' workflow
phase) and `predict_step` (detections in original-image pixels). They see pmap only through the
axis name passed to the loss for its cross-device normalisers, to the gradient mean and to the
dropout key, so a jit + sharding version is a small change. Images arrive as uint8 and are
normalised here, on the device (padded pixels become 0, as in mmdetection).

Randomness: the training step's dropout key is `fold_in(fold_in(key(seed), step), device)`, a
function of the config's seed, the step counter and the device index alone: a resumed run draws
exactly what the uninterrupted one drew, and the train state carries no key. The key is an 'rbg'
key (XLA's RngBitGenerator): dropout masks drawn with JAX's default threefry cost ~15% of a DETR
smoke step and ~30 s of its compile on the CPU (experiments/README.md).
"""
import jax
import optax

from jaxdet.ops.image import normalize_images

AXIS = 'batch'


def _images(batch, pipeline, dtype):
  return normalize_images(batch['image'], batch['img_shape'], mean=tuple(pipeline.mean),
                          std=tuple(pipeline.std), to_bgr=pipeline.to_bgr, dtype=dtype)


def _total(losses):
  return sum(v for k, v in losses.items() if k.startswith('loss_'))


def dropout_key(seed, step, axis_name=AXIS):
  """The dropout key of one training step on this device (see the module docstring)."""
  key = jax.random.fold_in(jax.random.key(seed, impl='rbg'), step)
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def train_step(state, batch, *, detector, tx, pipeline, dtype, seed=0, axis_name=AXIS):
  """One optimisation step on one device's share of the batch (run under pmap)."""
  rngs = {'dropout': dropout_key(seed, state['step'], axis_name)}

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state['batch_stats']}
    outputs, mutated = detector.module.apply(variables, _images(batch, pipeline, dtype),
                                             batch['img_shape'], train=True, rngs=rngs,
                                             mutable=['batch_stats'])
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
  """Losses without an update (mmdetection's 'val' workflow phase), BN in eval mode, no
  dropout. The padding images of the last batch (image_valid False) add nothing."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  outputs = detector.module.apply(variables, _images(batch, pipeline, dtype), batch['img_shape'],
                                  train=False)
  losses = detector.loss(outputs, batch, axis_name=axis_name)
  return jax.lax.pmean(dict(losses, loss=_total(losses)), axis_name)


def predict_step(state, batch, *, detector, pipeline, dtype):
  """Detections of one device's images, boxes in original pixels (fixed size + valid mask)."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  outputs = detector.module.apply(variables, _images(batch, pipeline, dtype), batch['img_shape'],
                                  train=False)
  return detector.predict(outputs, batch)
