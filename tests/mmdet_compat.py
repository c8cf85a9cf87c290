"""mmdetection 3.3 as the tests' oracle on mmcv-lite, which ships no compiled ops.

`stub_compiled_ops()` makes mmcv's compiled-op loader return nothing, so modules that only name a
compiled op import (calling one would fail); `mmdet()` then registers mmdetection's modules once
and returns its registries, structures and config folder (`build_model` builds one of its configs
with random weights), with mmcv's compiled `batched_nms`
replaced in dense-head post-processing by `greedy_batched_nms`, a plain loop with its semantics.
Tests that use this are marked `torch`; without mmdet installed they skip.
"""
import functools
import importlib.util
import os

import pytest


def stub_compiled_ops():
  """mmcv-lite (no `mmcv._ext`): its extension loader returns nothing instead of raising at
  import. A full mmcv keeps its compiled ops."""
  ext_loader = pytest.importorskip('mmcv.utils.ext_loader')
  if importlib.util.find_spec('mmcv._ext') is None:
    ext_loader.load_ext = lambda name, funcs: None


@functools.lru_cache(maxsize=None)
def mmdet():
  """dict(MODELS, TASK_UTILS, Config, ConfigDict, DetDataSample, InstanceData, configs): configs
  is the folder of mmdetection's own configs (`.mim/configs` in the installed package)."""
  stub_compiled_ops()
  package = pytest.importorskip('mmdet')
  from mmdet.models.dense_heads import base_dense_head
  from mmdet.registry import MODELS, TASK_UTILS
  from mmdet.structures import DetDataSample
  from mmdet.utils import register_all_modules
  from mmengine.config import Config, ConfigDict
  from mmengine.structures import InstanceData
  register_all_modules()
  base_dense_head.batched_nms = greedy_batched_nms  # mmcv's needs compiled ops
  return dict(MODELS=MODELS, TASK_UTILS=TASK_UTILS, Config=Config, ConfigDict=ConfigDict,
              DetDataSample=DetDataSample, InstanceData=InstanceData,
              configs=os.path.join(os.path.dirname(package.__file__), '.mim', 'configs'))


def build_model(config_path, seed=0):
  """mmdetection's model from one of its own configs (`config_path` under its configs folder,
  e.g. 'detr/detr_r50_8xb2-150e_coco.py'), with random weights: no pretrained backbone download
  (`init_cfg = None`), `init_weights()` after `torch.manual_seed(seed)`. Returns (model, cfg)."""
  import torch
  mm = mmdet()
  cfg = mm['Config'].fromfile(os.path.join(mm['configs'], config_path))
  cfg.model.backbone.init_cfg = None
  torch.manual_seed(seed)
  model = mm['MODELS'].build(cfg.model)
  model.init_weights()
  return model, cfg


def greedy_batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
  """mmcv.ops.batched_nms written as a plain loop: within each class (all one class when
  class-agnostic), highest score first (stable), drop the boxes whose IoU with a kept one exceeds
  `iou_threshold`. Returns (dets (K, 5) = boxes and scores, keep (K,)), by descending score."""
  import torch
  if nms_cfg.get('class_agnostic', class_agnostic):
    idxs = torch.zeros_like(idxs)
  kept = []
  for label in torch.unique(idxs):
    members = torch.nonzero(idxs == label)[:, 0]
    members = members[torch.sort(scores[members], descending=True, stable=True).indices]
    b = boxes[members].double()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.minimum(b[:, None, 2:], b[None, :, 2:])
             - torch.maximum(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)
    removed = torch.zeros(len(members), dtype=torch.bool)
    for i in range(len(members)):
      if not removed[i]:
        kept.append(int(members[i]))
        removed |= iou[i] > nms_cfg['iou_threshold']
  keep = torch.tensor(kept, dtype=torch.long)
  keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
  return torch.cat([boxes[keep], scores[keep, None]], dim=1), keep
