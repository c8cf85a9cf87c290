"""Checkpoints with orbax: the train state, the data iterator's state, and a few JSON extras.

Layout under `directory` (e.g. `work_dir/checkpoints`), one folder per step::

  1000/state/   the train state pytree (orbax StandardSave: params, batch_stats, opt_state, step, rng)
  1000/data/    the data iterator's state (JSON)
  1000/extra/   anything else JSON-able (`position`: step, epoch, iteration; class names, ...)

Saves are asynchronous (orbax `enable_async_checkpointing`): `save` copies the state to host
memory and returns; a background thread writes it. The next `save`, `wait`, `close`, `restore`
and the step listings wait for a save in flight first, so at most one is ever pending.

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp[-<time>]/`, then writes
`commit_success.txt` into it and renames it to `<step>/`. A save killed half way (SIGKILL, OOM,
lost node) leaves only a tmp folder, which is never listed as a step; the next `Checkpointer`
on that directory logs it and deletes it. `latest_step` additionally ignores step folders without
`commit_success.txt` (logged too). The run therefore resumes from the last complete checkpoint.

The state is saved from host or single-device arrays (un-replicate a pmapped state first) and
restored onto `jax.local_devices()[0]`, so a run may resume on another device count: the train
loop replicates after restoring. Multi-host: every process calls `save` / `restore` (orbax
coordinates; each array must then be fully replicated).

  ckpt = Checkpointer(work_dir + '/checkpoints', max_to_keep=3)
  if ckpt.latest_step() is not None:
    state, data_state, extra = ckpt.restore(jax.eval_shape(lambda: state))
  ...
  ckpt.save(step, state, data_state=loader_iter.get_state(), extra=position(step, 1000))
  ckpt.close()    # waits for the last save

`jaxdet.engine.save_cadence`: when to save between epoch ends (every N steps and/or M minutes)
and `position(step, steps_per_epoch)`, the epoch and iteration recorded in `extra`.
"""
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_COMMIT_FILE = 'commit_success.txt'  # written by orbax into a step folder before it is final
_TMP_MARK = '.orbax-checkpoint-tmp'  # orbax's suffix of a folder being written

log = logging.getLogger('jaxdet.checkpoint')


class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints of a run in `directory` (created if missing).

  `async_save`: write in a background thread (default); False: `save` returns when on disk.
  `.half_written`: names of folders of saves cut short found on opening (logged, then ignored:
  tmp folders are deleted, uncommitted step folders are left alone and never listed).
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1 or None (keep all), got {max_to_keep}')
    self.directory = os.path.abspath(os.fspath(directory))
    self.async_save = bool(async_save)
    self.half_written = half_written(self.directory)
    for name in self.half_written:
      what = ('deleting it' if _TMP_MARK in name else
              f'no {_COMMIT_FILE}, not a checkpoint; it is never resumed from')
      log.warning(f'ignoring half-written checkpoint {os.path.join(self.directory, name)} '
                  f'(a save cut short): {what}')
    policy = (ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep is not None
              else ocp.checkpoint_managers.PreserveAll())
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=True,
        cleanup_tmp_directories=True,      # leftovers of a killed save
        enable_async_checkpointing=self.async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_item_handlers(ocp.StandardCheckpointHandler))

  def all_steps(self) -> list:
    """Steps with a complete checkpoint, ascending (after the save in flight, if any)."""
    self.wait()
    return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, data_state: dict, extra: dict | None = None) -> bool:
    """Starts writing `state` (a pytree of arrays), `data_state` and `extra` (JSON-able dicts)
    as `step`, in the background; waits first for the previous save, if still in flight.

    When it returns, the state is in host memory (jax arrays are copied; numpy leaves are
    used as they are: do not modify them until `wait`), so the caller may donate or update its
    arrays. Returns False (and writes nothing) when `step` is already saved, e.g. a preemption
    save right after a periodic one. Deletes the oldest checkpoints beyond `max_to_keep`.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    _check_host_local(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_to_host(state)),
        data=ocp.args.JsonSave(_jsonable(data_state, 'data_state')),
        extra=ocp.args.JsonSave(_jsonable(extra or {}, 'extra')),
    )
    saved = self._manager.save(step, args=args, force=True)
    if not self.async_save:
      self.wait()
    return bool(saved)

  def saving(self) -> bool:
    """True while a save is being written in the background."""
    return bool(self._manager.is_saving_in_progress())

  def restore(self, abstract_state: Any, step: int | None = None):
    """Reads a checkpoint into the structure and dtypes of `abstract_state`.

    `abstract_state`: the train state, or its `jax.eval_shape` (ShapeDtypeStructs); optax
    NamedTuples and empty states come back as they are in it. `step`: default the latest.
    Returns `(state, data_state, extra)`; the state's arrays are jax Arrays on
    `jax.local_devices()[0]`.
    """
    step = self._resolve_step(step)   # (waits for a save in flight)
    target = _on_default_device(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        extra=ocp.args.JsonRestore(),
    ))
    return restored['state'], restored['data'], restored['extra'] or {}

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is on disk; raises its error if it failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _is_complete(self, step):
    return os.path.exists(os.path.join(self.directory, str(step), _COMMIT_FILE))

  def _resolve_step(self, step):
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f'no checkpoint in {self.directory}')
      return steps[-1]
    if int(step) not in steps:
      raise ValueError(f'no checkpoint for step {step} in {self.directory} (steps: {steps})')
    return int(step)


def load_params(directory: str, step: int | None = None, keys=('params', 'batch_stats')) -> dict:
  """Restores only `keys` of a checkpoint's state (for evaluation or `load_from`).

  Needs no optimizer structure: the shapes come from the checkpoint's metadata. Returns a dict
  with those of `keys` that the checkpoint has, as jax Arrays on `jax.local_devices()[0]`.
  `directory`: a Checkpointer directory (`work_dir/checkpoints`); `step`: default the latest.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint directory not found: {directory}')
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler)) as manager:
    steps = sorted(s for s in manager.all_steps()
                   if os.path.exists(os.path.join(directory, str(s), _COMMIT_FILE)))
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    if step is None:
      step = steps[-1]
    elif int(step) not in steps:
      raise ValueError(f'no checkpoint for step {step} in {directory} (steps: {steps})')
    tree = manager.item_metadata(step)['state'].tree
    wanted = {k: tree[k] for k in keys if k in tree}
    if not wanted:
      raise ValueError(f'checkpoint {directory}/{step} has none of {keys} (has {sorted(tree)})')
    target = _on_default_device(wanted)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    restored = manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
  return dict(restored['state'])


def resolve_checkpoint(path: str):
  """`(directory, step)` for a run's work_dir (its latest checkpoint), its `checkpoints` folder
  (latest) or one step's folder inside it (that step); `step` is None for "the latest".

  Raises `ValueError` (one line) when `path` does not exist.
  """
  path = os.fspath(path)
  if not path or not os.path.isdir(path):
    raise ValueError(f'checkpoint not found: {path!r} (give a work_dir, its checkpoints folder '
                     'or a step folder inside it)')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  base = os.path.basename(os.path.normpath(path))
  if base.isdigit():
    return os.path.dirname(os.path.normpath(path)), int(base)
  return path, None


def complete_steps(directory: str) -> list:
  """Steps of `directory` with a complete (committed) checkpoint, ascending; no orbax needed."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.exists(os.path.join(directory, d, _COMMIT_FILE)))


def half_written(directory: str) -> list:
  """Names of the folders in `directory` that saves cut short left behind: orbax tmp folders
  (`<step>.orbax-checkpoint-tmp-<time>`) and step folders without `commit_success.txt`."""
  if not os.path.isdir(directory):
    return []
  return sorted(d for d in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, d))
                and (_TMP_MARK in d
                     or d.isdigit() and not os.path.exists(os.path.join(directory, d, _COMMIT_FILE))))


def load_variables(path: str, keys=('params', 'batch_stats')):
  """`load_params` of a work_dir / checkpoints folder / step folder (`resolve_checkpoint`).

  Returns `(variables, directory, step)` with the step actually read. Every problem (missing
  path, no complete checkpoint, unreadable files) is a one-line `ValueError` naming the path.
  """
  directory, step = resolve_checkpoint(path)
  steps = complete_steps(directory)
  if not steps:
    raise ValueError(f'no complete checkpoint in {directory} (from {path!r})')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'no complete checkpoint for step {step} in {directory} (steps: {steps})')
  try:
    variables = load_params(directory, step, keys)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(' '.join(str(e).split())) from None
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore read errors)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f'cannot read checkpoint {directory}/{step}: {first}') from None
  return variables, directory, step


def load_extra(directory: str, step: int) -> dict:
  """The JSON `extra` dict saved with a checkpoint step ({} when there is none)."""
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  try:
    with ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler)) as m:
      restored = m.restore(int(step), args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(restored['extra'] or {})
  except Exception:  # pylint: disable=broad-except  (an older checkpoint without `extra`)
    return {}


# ------------------------------------------------------------------------------ load_from merge

def _key(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _flat(tree):
  """{'a': {'b': x}} -> {'a/b': x}."""
  return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def diff_variables(expected, loaded):
  """How `loaded` (a checkpoint's variables) differs from `expected` (a model's, or their
  `jax.eval_shape`), leaf by leaf, keyed 'params/head/conv_cls/kernel'.

  Returns dict(shape=[(key, loaded_shape, expected_shape)], missing=[keys only in expected],
  unexpected=[keys only in loaded]); all empty when they fit.
  """
  e, l = _flat(expected), _flat(loaded)
  shape = [(k, tuple(np.shape(l[k])), tuple(np.shape(e[k]))) for k in e
           if k in l and tuple(np.shape(l[k])) != tuple(np.shape(e[k]))]
  return dict(shape=shape, missing=[k for k in e if k not in l],
              unexpected=[k for k in l if k not in e])


def describe_diff(diff, limit=3) -> str:
  """One line naming the first `limit` differences of each kind (`diff_variables`)."""
  parts = []
  if diff['shape']:
    items = [f'{k} {tuple(a)} -> {tuple(b)}' for k, a, b in diff['shape'][:limit]]
    more = len(diff['shape']) - limit
    parts.append(f'{len(diff["shape"])} tensor(s) with other shapes (checkpoint -> model): '
                 + ', '.join(items) + (f', ... ({more} more)' if more > 0 else ''))
  for kind, what in (('missing', 'missing from the checkpoint'),
                     ('unexpected', 'only in the checkpoint')):
    if diff[kind]:
      more = len(diff[kind]) - limit
      parts.append(f'{len(diff[kind])} {what}: ' + ', '.join(diff[kind][:limit])
                   + (f', ... ({more} more)' if more > 0 else ''))
  return '; '.join(parts)


def merge_variables(init, loaded):
  """`load_from`: the model's freshly initialised `init` variables with every leaf that the
  checkpoint has with the same shape replaced by the checkpoint's (cast to init's dtype).

  Leaves whose shape differs (e.g. `head/conv_cls` after a change of num_classes) or that the
  checkpoint lacks keep their fresh initialisation; checkpoint leaves the model does not have
  are ignored. Pure (host numpy in, host numpy out). Returns `(merged, diff)` with `diff` as
  `diff_variables(init, loaded)`: its 'shape' and 'missing' keys are the re-initialised leaves.
  """
  diff = diff_variables(init, loaded)
  fresh = {k for k, _, _ in diff['shape']} | set(diff['missing'])
  flat_loaded = _flat(loaded)

  def pick(path, leaf):
    key = _key(path)
    leaf = np.asarray(leaf)
    return leaf if key in fresh else np.asarray(flat_loaded[key], leaf.dtype)
  return jax.tree_util.tree_map_with_path(pick, init), diff


def _item_handlers(state_handler):
  return dict(state=state_handler(), data=ocp.JsonCheckpointHandler(),
              extra=ocp.JsonCheckpointHandler())


def _on_default_device(tree):
  """Leaves with .shape/.dtype -> ShapeDtypeStructs placed on jax.local_devices()[0]."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def abstract(x):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    raise ValueError(f'restore target leaves must be arrays or ShapeDtypeStructs, got {type(x)}')

  return jax.tree.map(abstract, tree)


def _to_host(state):
  """jax arrays -> numpy copies (so a save in flight never reads a donated or updated buffer);
  numpy leaves and typed PRNG keys as they are."""
  def host(x):
    if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return np.array(x, copy=True)
    return x
  return jax.tree.map(host, state)


def _check_host_local(state):
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated and len(leaf.devices()) > 1:
      raise ValueError(f'state leaf {jax.tree_util.keystr(path)} is sharded over '
                       f'{len(leaf.devices())} devices; un-replicate the state before saving '
                       '(e.g. jax.tree.map(lambda x: x[0], state) after pmap)')


def _jsonable(value, name):
  """dicts/lists/tuples of str/bool/int/float/None, numpy scalars and arrays -> plain JSON types."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v, name) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, name) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if isinstance(value, jax.Array):
    return np.asarray(value).tolist()
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  raise ValueError(f'{name} must be JSON-able; got {type(value).__name__}: {value!r}')


# ------------------------------------------------------------------------------------ preemption

class StopRequest:
  """Set by SIGTERM / SIGINT: `.requested` turns True and `.signal` names the signal.

  The train loop checks `.requested` each step, saves a checkpoint and returns. The first signal
  also puts back the previous handlers, so a second Ctrl-C raises KeyboardInterrupt (and a second
  SIGTERM terminates) as usual. `.uninstall()` (or leaving the `with` block) restores them too.
  """

  def __init__(self):
    self.requested = False
    self.signal = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal = signal.Signals(signum).name
    self.uninstall()

  def uninstall(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.uninstall()


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGINT)) -> StopRequest:
  """Catches SIGTERM / SIGINT into a `StopRequest` (see there).

  Signal handlers can only be set from the main thread; elsewhere nothing is installed and
  `.requested` stays False.
  """
  stop = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    return stop
  for signum in signals:
    stop._previous[signum] = signal.getsignal(signum)
    signal.signal(signum, stop._handle)
  return stop
