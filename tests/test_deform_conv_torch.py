"""deform_conv2d and ModulatedDeformConv2dPack against torchvision's compiled kernel and mmcv's
module (forward and gradients).  Needs torch + torchvision (+ mmcv / mmdet for the layer tests)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from jaxdet.models.layers.deform_conv import ModulatedDeformConv2dPack, params_from_torch  # noqa: E402
from jaxdet.ops.deform_conv import deform_conv2d, output_size  # noqa: E402

import mmdet_compat

pytestmark = pytest.mark.torch

RTOL = 1e-4  # max |jax - torch| / max |torch|


def _rel(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6)


nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)


# (B, H, W, Cin, Cout, (kh, kw), stride, padding, dilation, deform_groups, groups, offsets)
CASES = {
    "nasfcos_like": (2, 10, 12, 16, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1, "random"),
    "combined": (2, 9, 8, 8, 6, (3, 2), (2, 1), (2, 0), (1, 2), 4, 2, "far"),
    "integer": (1, 7, 8, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1, "integer"),
    "zero": (1, 7, 8, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "zero"),
    "no_mask": (2, 8, 7, 6, 5, (3, 3), (2, 2), (1, 1), (1, 1), 3, 1, "nomask"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torchvision_forward_and_gradients(name):
  b, h, w, cin, cout, (kh, kw), stride, padding, dilation, dg, groups, kind = CASES[name]
  rng = np.random.default_rng(list(CASES).index(name))
  ho = output_size(h, kh, stride[0], padding[0], dilation[0])
  wo = output_size(w, kw, stride[1], padding[1], dilation[1])
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  offset = rng.uniform(-3, 3, (b, ho, wo, dg * kh * kw * 2)).astype(np.float32)
  if kind == "far":
    offset = np.where(rng.uniform(size=offset.shape) < 0.2, 20 * offset, offset)
  elif kind == "integer":
    offset = np.round(offset)
  elif kind == "zero":
    offset = np.zeros_like(offset)
  mask = None if kind == "nomask" else rng.uniform(size=(b, ho, wo, dg * kh * kw)).astype(
      np.float32)
  kernel = rng.standard_normal((kh, kw, cin // groups, cout)).astype(np.float32)
  grad_out = rng.standard_normal((b, ho, wo, cout)).astype(np.float32)
  conf = dict(stride=stride, padding=padding, dilation=dilation, deform_groups=dg, groups=groups)

  # torchvision: NCHW, weight (Cout, Cin/G, kh, kw); deform groups inferred from the offsets.
  tx, toff = nchw(x).requires_grad_(), nchw(offset).requires_grad_()
  tmask = None if mask is None else nchw(mask).requires_grad_()
  tweight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).requires_grad_()
  tout = torchvision.ops.deform_conv2d(tx, toff, tweight, stride=stride, padding=padding,
                                       dilation=dilation, mask=tmask)
  tout.backward(nchw(grad_out))

  if mask is None:
    def run(x, o, k, g):
      out, vjp = jax.vjp(lambda x, o, k: deform_conv2d(x, o, None, k, **conf), x, o, k)
      return out, vjp(g)
    out, (gx, goff, gk) = jax.jit(run)(x, offset, kernel, grad_out)
  else:
    def run(x, o, m, k, g):
      out, vjp = jax.vjp(lambda *a: deform_conv2d(*a, **conf), x, o, m, k)
      return out, vjp(g)
    out, (gx, goff, gm, gk) = jax.jit(run)(x, offset, mask, kernel, grad_out)
    assert _rel(gm, nhwc(tmask.grad)) < RTOL
  assert _rel(out, nhwc(tout)) < RTOL
  assert _rel(gx, nhwc(tx.grad)) < RTOL
  assert _rel(goff, nhwc(toff.grad)) < RTOL
  assert _rel(gk, tweight.grad.numpy().transpose(2, 3, 1, 0)) < RTOL


# ------------------------------------------------------------------------------------------
# The Flax layer against mmcv's ModulatedDeformConv2dPack.  mmcv-lite has no compiled ops, so
# its forward is run as mmcv writes it with torchvision's kernel in place of mmcv's (what
# mmcv itself does on MLU devices).

@pytest.fixture(scope="module")
def mmcv_dcn_class():
  pytest.importorskip("mmcv")
  mmdet_compat.stub_compiled_ops()
  from mmcv.ops.modulated_deform_conv import ModulatedDeformConv2dPack as MmcvDCN
  return MmcvDCN


def _mmcv_forward(m, x):
  """mmcv's ModulatedDeformConv2dPack.forward with torchvision's deform_conv2d."""
  out = m.conv_offset(x)
  o1, o2, mask = torch.chunk(out, 3, dim=1)
  offset = torch.cat((o1, o2), dim=1)
  mask = torch.sigmoid(mask)
  return torchvision.ops.deform_conv2d(x, offset, m.weight, m.bias, stride=m.stride,
                                       padding=m.padding, dilation=m.dilation, mask=mask)


@pytest.mark.parametrize("bias,stride,groups", [(True, 1, 1), (False, 2, 2)])
def test_layer_matches_mmcv_module(mmcv_dcn_class, bias, stride, groups):
  torch.manual_seed(0)
  m = mmcv_dcn_class(8, 6, 3, stride=stride, padding=1, groups=groups, deform_groups=2,
                     bias=bias)
  with torch.no_grad():  # offsets of a few pixels and a non-trivial mask
    m.conv_offset.weight.normal_(0, 0.3)
    m.conv_offset.bias.normal_(0, 1.0)
    if bias:
      m.bias.normal_()
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 9, 11, 8)).astype(np.float32)
  tx = nchw(x).requires_grad_()
  tout = _mmcv_forward(m, tx)
  grad_out = rng.standard_normal(nhwc(tout).shape).astype(np.float32)
  tout.backward(nchw(grad_out))

  layer = ModulatedDeformConv2dPack(6, kernel_size=3, strides=stride, padding=1, groups=groups,
                                    deform_groups=2, use_bias=bias)
  params = params_from_torch(m.state_dict())
  expected_shapes = jax.tree_util.tree_map(
      lambda s: s.shape, jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
  assert jax.tree_util.tree_map(lambda a: a.shape, params) == expected_shapes
  def run(p, x, g):
    out, vjp = jax.vjp(lambda p, x: layer.apply({"params": p}, x), p, x)
    return out, vjp(g)
  out, (grad_params, grad_x) = jax.jit(run)(params, x, grad_out)
  assert _rel(out, nhwc(tout)) < RTOL
  assert _rel(grad_x, nhwc(tx.grad)) < RTOL
  torch_grads = params_from_torch({k: p.grad for k, p in m.named_parameters()})
  for path, g in jax.tree_util.tree_leaves_with_path(grad_params):
    t = torch_grads
    for key in path:
      t = t[key.key]
    assert _rel(g, t) < RTOL, path


def test_nasfcos_head_dcn_converts_one_to_one(mmcv_dcn_class):
  """The DCNs of mmdetection's NASFCOSHead: every torch tensor maps to one flax parameter of
  the same size, and the converted layer computes what the torch module computes."""
  pytest.importorskip("mmdet")
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules
  register_all_modules()
  head = MODELS.build(dict(
      type="NASFCOSHead", num_classes=80, in_channels=256, feat_channels=256,
      strides=[8, 16, 32, 64, 128], norm_cfg=dict(type="GN", num_groups=32),
      loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
      loss_bbox=dict(type="IoULoss", loss_weight=1.0),
      loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0)))
  head.init_weights()
  state = head.state_dict()
  layer = ModulatedDeformConv2dPack(256, kernel_size=3, padding=1, deform_groups=2)
  apply = jax.jit(layer.apply)
  x = np.random.default_rng(0).standard_normal((1, 6, 7, 256)).astype(np.float32)
  for branch in ("cls_convs", "reg_convs"):
    for index in (0, 2):  # dconv3x3, conv3x3, dconv3x3, conv1x1
      prefix = f"{branch}.{index}.conv."
      torch_keys = {k for k in state if k.startswith(prefix)}
      assert torch_keys == {prefix + n for n in ("weight", "bias", "conv_offset.weight",
                                                 "conv_offset.bias")}
      params = params_from_torch(state, prefix)
      assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == \
          sum(state[k].numel() for k in torch_keys) == 714_550
      # mmdetection's init leaves the offset conv at zero: the layer starts as conv * 0.5.
      assert not params["conv_offset"]["kernel"].any()
      module = getattr(head, branch)[index].conv
      with torch.no_grad():
        module.conv_offset.weight.normal_(0, 0.02)  # make the check non-trivial
        expected = nhwc(_mmcv_forward(module, nchw(x)))
      params = params_from_torch(module.state_dict())
      assert _rel(apply({"params": params}, x), expected) < RTOL
