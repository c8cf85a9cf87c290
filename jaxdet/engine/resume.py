"""Resuming a run with another global batch (another device count or `samples_per_gpu`).

With the same global batch a resume is exact: the state and the data iterator continue with the
batch that would have come next. With another global batch the steps mean something else, so the
position is carried over in epochs, as mmdetection's epoch-based loop does:

  epoch e, batch r of the old epoch's B_old batches  ->  epoch e, batch floor(r * B_new / B_old)
  of the new epoch's B_new batches (step e * B_new + that).

The epoch's image order depends on (seed, epoch) alone, but batches are formed per size bucket,
so a mid-epoch position maps to the same fraction of the epoch, not to the same images: a few
images of that epoch may be seen twice or not at all (none at an epoch boundary, where periodic
checkpoints are written). The optimizer's schedule counters move to the new step, so the LR
schedule (epochs, milestones, scaled to the new global batch) continues where the run was;
momentum and parameters carry over unchanged.
"""
import numpy as np
import optax


def remap_to_global_batch(state, data_state, *, global_batch, batches_per_epoch):
  """(state, data_state, message) continuing a checkpoint with another global batch.

  Args:
    state: the restored host state dict(step, params, batch_stats, opt_state).
    data_state: the restored `TrainIterator.get_state()` (next_batch, global_batch,
      batches_per_epoch, seed, version).
    global_batch, batches_per_epoch: of this run's train loader.
  Returns the state with `step` and the optimizer's `count`s moved, the iterator state for this
  loader, and a one-line description of the mapping.
  """
  old_batch, old_bpe = int(data_state['global_batch']), int(data_state['batches_per_epoch'])
  epoch, r = divmod(int(data_state['next_batch']), old_bpe)
  new_r = r * batches_per_epoch // old_bpe
  step = epoch * batches_per_epoch + new_r
  state = dict(state, step=np.asarray(step, np.int32),
               opt_state=optax.tree_utils.tree_set(state['opt_state'],
                                                   count=np.asarray(step, np.int32)))
  data_state = dict(data_state, next_batch=step, global_batch=int(global_batch),
                    batches_per_epoch=int(batches_per_epoch))
  message = (f'global batch {old_batch} -> {global_batch}: epoch {epoch + 1} batch {r}/{old_bpe} '
             f'continues as batch {new_r}/{batches_per_epoch} (step {step})')
  return state, data_state, message
