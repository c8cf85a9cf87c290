"""Train a detector, evaluate it with pycocotools, checkpoint and resume.

  python -m jaxdet.train --config configs/atss.py:smoke [--workdir DIR] [--config.KEY=VALUE ...]

Reads top to bottom: `build_data` (sources and loaders), `create_state` (init, pretrained
weights, resume or `load_from`), `compile_steps` (the pmapped steps of `jaxdet.engine.steps`),
then `train_and_evaluate`, the loop, whose pieces each fit on a screen: `log_train_metrics`
(log line, NaN stop), `end_of_epoch` (mmdetection's val phase, checkpoint, COCO evaluation via
`jaxdet.evaluation.evaluate_loader`). `jax.pmap` spreads each batch over the local devices (axis
name 'batch'); the model and its loss only see that name, for their cross-device means.
Running the same command again with the same work_dir resumes from its last checkpoint (with
another global batch, e.g. on another device count, at the same point of the same epoch: see
`jaxdet.engine.resume`).
`--config.load_from=DIR` (a jaxdet work_dir, checkpoints folder or step folder) fine-tunes: params
and batch_stats from that checkpoint, a fresh optimizer and step 0; tensors whose shapes differ
(e.g. `head/conv_cls` for another num_classes) keep their fresh initialisation, named in one log
line. A work_dir that already has checkpoints resumes instead (mmdetection: resume > load_from).
Checkpoints also record the dataset's class names and category ids (`extra['classes']`) for
`jaxdet.infer` / `jaxdet.Detector`.
Multi-host: `--config.distributed=True` calls `jax.distributed.initialize()` first. On TPU pods,
SLURM or Open MPI it finds the coordinator itself; elsewhere start one process per host with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (any of these flags implies
distributed). Each process loads its share of every global batch, gradients are averaged over
all devices of all processes, process 0 writes logs, metrics and detections.
"""
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxdet import evaluation
from jaxdet.data import loader as data_loader
from jaxdet.data.sources import build_source, check_num_classes
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine import logging as jd_logging
from jaxdet.engine.cpu_devices import request_cpu_devices, split_batch
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags
from jaxdet.engine.optimizer import lr_scaling_line, scaled_lr
from jaxdet.engine.resume import remap_to_global_batch
from jaxdet.engine.save_cadence import Cadence, position, resume_line
from jaxdet.engine.schedules import build_schedule
from jaxdet.engine.steps import AXIS, predict_step, train_step, val_step
from jaxdet.engine.train_state import create_train_state, replicate, unreplicate
from jaxdet.models import weights
from jaxdet.models.detectors import build_detector, compute_dtype

log = logging.getLogger('jaxdet.train')


# ----------------------------------------------------------------------------- building

def build_data(config):
  """The val source and the train / eval loaders of `config.data` on the local devices."""
  num_devices = jax.local_device_count()
  train_source = build_source(config.data, 'train')
  val_source = build_source(config.data, 'val')
  check_num_classes(config.model.num_classes, train_source)
  train_loader = data_loader.build_train_loader(config.data, train_source, seed=config.seed,
                                                num_devices=num_devices)
  eval_loader = data_loader.build_eval_loader(config.data, val_source, num_devices=num_devices)
  return val_source, train_loader, eval_loader


def _log_lr_line(config, num_devices, global_batch):
  o = config.optimizer
  lr = scaled_lr(o.base_lr, global_batch, o.base_batch)
  per_device = global_batch // (num_devices * jax.process_count())
  log.info(lr_scaling_line(o.base_lr, lr, num_devices * jax.process_count(), per_device,
                           o.base_batch))
  return lr


def load_from(host_state, tx, path):
  """`config.load_from`: the train state with params and batch_stats from a jaxdet checkpoint
  (a work_dir, its checkpoints folder or a step folder), a fresh optimizer state and step 0.

  Tensors whose shape differs from the model's (e.g. `head/conv_cls` after a change of
  num_classes) or that the checkpoint lacks keep their fresh initialisation; one log line names
  them. A missing or unreadable checkpoint is a one-line ValueError.
  """
  try:
    loaded, directory, step = ckpt.load_variables(path)
  except ValueError as e:
    hint = ('; configs/detr.py:smoke starts from the ATSS smoke run: run python -m jaxdet.train '
            '--config configs/atss.py:smoke first' if 'atss_smoke' in str(path) else '')
    raise ValueError(f'config.load_from: {e}{hint}') from None
  init = dict(params=host_state['params'], batch_stats=host_state['batch_stats'])
  merged, diff = ckpt.merge_variables(init, loaded)
  total = len(jax.tree_util.tree_leaves(init))
  fresh = len(diff['shape']) + len(diff['missing'])
  line = f'load_from {directory}/{step}: {total - fresh} of {total} tensors loaded'
  if fresh or diff['unexpected']:
    line += ('; kept the fresh initialisation of those not loaded: '
             + ckpt.describe_diff(diff, limit=10))
  log.info(line)
  return dict(host_state, step=np.zeros((), np.int32), params=merged['params'],
              batch_stats=merged['batch_stats'], opt_state=tx.init(merged['params']))


def create_state(config, detector, train_loader, schedule, checkpointer, pretrained):
  """The host train state to start from, the optimizer and the data iterator's state: a fresh
  init (ImageNet weights from `pretrained`), the work_dir's last checkpoint (resume, remapped
  to another global batch if need be), or `config.load_from`."""
  image_shape = (1,) + tuple(train_loader.shapes[0][2:])
  host_state, tx = create_train_state(detector, config, image_shape, schedule,
                                      pretrained=pretrained)
  data_state = None
  if checkpointer.latest_step() is not None:
    host_state, data_state, extra = checkpointer.restore(host_state)
    log.info(resume_line(int(host_state['step']), extra, data_state, train_loader.batches_per_epoch)
             + (' (config.load_from is ignored when resuming)' if config.get('load_from') else ''))
    if data_state and data_state.get('global_batch') != train_loader.global_batch:
      host_state, data_state, how = remap_to_global_batch(
          host_state, data_state, global_batch=train_loader.global_batch,
          batches_per_epoch=train_loader.batches_per_epoch)
      log.info(how)
  elif config.get('load_from', ''):
    host_state = load_from(host_state, tx, config.load_from)
  return host_state, tx, data_state


@dataclasses.dataclass(frozen=True)
class Steps:
  """The pmapped steps: train (donates its state), val (losses) and predict (detections)."""
  train: Callable
  val: Callable
  predict: Callable


def compile_steps(config, detector, tx):
  statics = dict(detector=detector, pipeline=config.data.pipeline,
                 dtype=compute_dtype(config.dtype))
  return Steps(
      train=jax.pmap(functools.partial(train_step, tx=tx, seed=config.seed, **statics),
                     axis_name=AXIS, donate_argnums=(0,)),
      val=jax.pmap(functools.partial(val_step, **statics), axis_name=AXIS),
      predict=jax.pmap(functools.partial(predict_step, **statics), axis_name=AXIS))


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Run:
  """What the loop's pieces share: config, work_dir, data, steps, writer and checkpointer."""
  config: Any
  work_dir: str
  val_source: Any
  train_loader: Any
  eval_loader: Any
  steps: Steps
  schedule: Callable
  writer: Any
  checkpointer: Any
  total_steps: int
  throughput: float = None   # images / s, timed between log lines (not the first, compiling step)
  t_log: float = None
  step_log: int = 0

  @property
  def steps_per_epoch(self):
    return self.train_loader.batches_per_epoch


def train_and_evaluate(config, work_dir):
  """The whole run; returns the last evaluation's metrics."""
  os.makedirs(work_dir, exist_ok=True)
  jd_logging.setup_logging(work_dir)
  evaluation.enable_compilation_cache()  # val / predict programs (one per test shape) kept
  config_cli.save_config(config, os.path.join(work_dir, 'config.json'))  # as given
  config, split_message = split_batch(config)  # config.cpu_devices
  if split_message:
    log.info(split_message)
  num_devices = jax.local_device_count()
  resuming = bool(ckpt.complete_steps(os.path.join(work_dir, 'checkpoints')))
  # ImageNet weights only for a fresh start (a resume or load_from overwrites them); a missing
  # file fails here, before any data is read.
  pretrained = '' if resuming or config.get('load_from', '') else config.model.backbone.pretrained
  if pretrained and not os.path.isfile(pretrained):
    raise weights.WeightsFileNotFoundError(weights.missing_weights_message(pretrained))

  val_source, train_loader, eval_loader = build_data(config)
  steps_per_epoch = train_loader.batches_per_epoch
  total_steps = config.schedule.epochs * steps_per_epoch
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  lr = _log_lr_line(config, num_devices, train_loader.global_batch)
  log.info(f'{steps_per_epoch} steps/epoch, {total_steps} steps; training compiles '
           f'{train_loader.num_programs} program(s) {train_loader.shapes}, evaluation '
           f'{eval_loader.num_programs}')

  detector = build_detector(config.model, config.dtype)
  schedule = build_schedule(lr, config.schedule, steps_per_epoch=steps_per_epoch)
  checkpointer = ckpt.Checkpointer(os.path.join(work_dir, 'checkpoints'),
                                   max_to_keep=config.max_to_keep)
  host_state, tx, data_state = create_state(config, detector, train_loader, schedule,
                                            checkpointer, pretrained)
  start_step = int(host_state['step'])
  run = Run(config=config, work_dir=work_dir, val_source=val_source, train_loader=train_loader,
            eval_loader=eval_loader, steps=compile_steps(config, detector, tx),
            schedule=schedule, writer=jd_logging.MetricWriter(work_dir),
            checkpointer=checkpointer, total_steps=total_steps, step_log=start_step)
  state = replicate(host_state)
  del host_state

  signals = ckpt.install_signal_handlers()
  iterator = train_loader.iterator(data_state)
  classes = dict(names=list(val_source.class_names), cat_ids=list(val_source.cat_ids))
  cadence = Cadence.from_config(config)   # checkpoints between epoch ends (steps / minutes)

  def save(step):   # in the background: returns once the state is on the host
    if checkpointer.save(step, unreplicate(state), data_state=iterator.get_state(),
                         extra=dict(position(step, steps_per_epoch), classes=classes)):
      cadence.saved()
  last_metrics, step = {}, start_step
  bar = jd_logging.ProgressBar(total_steps, 'train', initial=start_step)
  try:
    while step < total_steps:
      state, metrics = run.steps.train(state, next(iterator))
      step += 1
      bar.update()
      epoch = (step - 1) // steps_per_epoch + 1
      epoch_end = step % steps_per_epoch == 0 or step == total_steps
      if step % config.log_interval == 0 or epoch_end or step == start_step + 1:
        log_train_metrics(run, metrics, step, epoch)
      if signals.requested:
        save(step)
        checkpointer.wait()   # on disk before the process exits
        log.info(f'stopped by signal at step {step}; checkpoint saved, rerun to resume')
        return last_metrics
      if cadence.due(step):
        save(step)
      if epoch_end:
        last_metrics = end_of_epoch(run, state, save, step, epoch) or last_metrics
    checkpointer.wait()   # the last save is on disk when the run returns
  finally:
    signals.uninstall()   # in-process callers (tests, notebooks) get their handlers back
    bar.close()
    iterator.close()
    checkpointer.close()
    run.writer.close()
  return last_metrics


def log_train_metrics(run, metrics, step, epoch):
  """One training log line (losses, lr, throughput, ETA, memory) and its scalars; stops the run
  with a FloatingPointError naming the last good checkpoint when the loss is not finite."""
  m = {k: float(v) for k, v in unreplicate(metrics).items()}
  if not np.isfinite(m['loss']):
    raise FloatingPointError(
        f'loss is {m["loss"]} at step {step}: stopping; the last good checkpoint is '
        f'step {run.checkpointer.latest_step()}')
  now, batch = time.time(), run.train_loader.global_batch
  if run.t_log is not None and step > run.step_log:
    run.throughput = batch * (step - run.step_log) / (now - run.t_log)
  run.t_log, run.step_log = now, step
  eta = (run.total_steps - step) * batch / run.throughput if run.throughput else None
  lr_now = float(run.schedule(step - 1))
  log.info(jd_logging.format_log_line(
      epoch=epoch, step=step, steps_per_epoch=run.steps_per_epoch, lr=lr_now, losses=m,
      img_per_s=run.throughput, eta_s=eta, mem_bytes=jd_logging.device_memory_bytes()))
  run.writer.scalars(step, dict(kind='train', lr=lr_now, **m,
                                **({'img_per_s': run.throughput} if run.throughput else {})))


def end_of_epoch(run, state, save, step, epoch):
  """mmdetection's val phase (losses on the val set), the epoch's checkpoint and its COCO
  evaluation, each at its configured interval (and at the end). Returns the evaluation's
  metrics, or None when the epoch has none."""
  config, last = run.config, step == run.total_steps
  if any(phase == 'val' for phase, _ in config.workflow):
    vals = [jax.device_get(run.steps.val(state, b)) for b in run.eval_loader]
    vm = {k: float(np.mean([v[k][0] for v in vals])) for k in vals[0]}
    log.info(f'Epoch(val) [{epoch}]  ' + '  '.join(f'{k}: {v:.4f}' for k, v in vm.items()))
    run.writer.scalars(step, dict(kind='val', epoch=epoch, **vm))
  if epoch % config.checkpoint_interval == 0 or last:
    save(step)
  if epoch % config.eval_interval == 0 or last:
    return evaluate_and_report(run, state, step, epoch)
  return None


def evaluate_and_report(run, state, step, epoch):
  """COCO evaluation of the current state: scalars, `results.md` and the results table."""
  log.info(f'evaluating epoch {epoch} (step {step}) on {run.eval_loader.num_images} images')
  metrics = evaluation.evaluate_loader(run.steps.predict, state, run.eval_loader,
                                       run.val_source, work_dir=run.work_dir,
                                       tag=f'epoch_{epoch}')
  scalars = {k: metrics[k] for k in evaluation.METRICS}
  run.writer.scalars(step, dict(kind='eval', epoch=epoch, **scalars))
  row = dict(run.config.results_row.to_dict() if hasattr(run.config.results_row, 'to_dict')
             else run.config.results_row)
  table_row = {'Network': row.get('network'), 'Dataset': row.get('dataset'),
               'Backbone': row.get('backbone'), 'style': row.get('style'),
               'Lr schd': row.get('lr_schd'), 'Mem': jd_logging.device_memory_bytes() / 2**30,
               'img/s': run.throughput, **scalars}
  table = evaluation.format_results_table([table_row])
  if jax.process_index() == 0:
    with open(os.path.join(run.work_dir, 'results.md'), 'w') as f:
      f.write(table + '\n')
  log.info(table)
  return metrics


DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def initialize_distributed(flags):
  """`jax.distributed.initialize` with the process flags given (None: found from the cluster)."""
  kwargs = {}
  for name in DISTRIBUTED_FLAGS:
    value = flags.get(name)
    if value is None:
      continue
    if name != 'coordinator_address':
      try:
        value = int(value)
      except (TypeError, ValueError):
        raise config_cli.ConfigError(f'--{name} must be an int, got {value!r}') from None
    kwargs[name] = value
  jax.distributed.initialize(**kwargs)


USAGE = config_cli.Usage(
    command='python -m jaxdet.train',
    summary='Train a detector, evaluate it with pycocotools, checkpoint; the same command with '
            'the same work_dir resumes.',
    flags=(('--workdir DIR', "checkpoints, logs and results (default: the config's work_dir)"),
           ('--coordinator_address HOST:PORT', 'multi-host: the coordinator (implies distributed)'),
           ('--num_processes N', 'multi-host: the number of processes'),
           ('--process_id I', "multi-host: this process's index")),
    more="the config file's docstring (command, time, result), e.g. configs/atss.py; README.md "
         '"Training, evaluation, overrides"; python -m pydoc jaxdet.train.')


def main(argv=None):
  spec, overrides, flags = config_cli.parse_args(
      sys.argv[1:] if argv is None else argv, known_flags=('workdir',) + DISTRIBUTED_FLAGS,
      usage=USAGE)
  config = config_cli.load_config(spec, overrides)
  set_xla_cpu_flags(config)  # these two before JAX starts its backends
  request_cpu_devices(config)
  if config.distributed or any(flags.get(name) is not None for name in DISTRIBUTED_FLAGS):
    initialize_distributed(flags)
  work_dir = flags.get('workdir') or config.work_dir
  train_and_evaluate(config, work_dir)


if __name__ == '__main__':
  config_cli.main_error_exit(main)
