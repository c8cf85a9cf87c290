"""deform_conv2d against a slow loop reference (torchvision's CPU kernel written out in numpy),
against lax.conv_general_dilated (zero offsets), hand-worked border cases, and the Flax layer."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models.layers.deform_conv import ModulatedDeformConv2dPack
from jaxdet.ops.deform_conv import deform_conv2d, output_size


# ------------------------------------------------------------------------------------------
# Reference: per output pixel, per deform group, per kernel point, one bilinear sample, written
# after torchvision's deform_conv2d_kernel.cpp (bilinear_interpolate, get_coordinate_weight,
# deformable_col2im), in float64.

def _pixel(img, y, x):
  h, w, _ = img.shape
  return img[y, x] if 0 <= y < h and 0 <= x < w else np.zeros(img.shape[-1])


def _bilinear(img, y, x):
  """Value at (y, x) of img (H, W, C): zero outside, 0 when y <= -1, y >= H (same for x)."""
  h, w, _ = img.shape
  if y <= -1 or y >= h or x <= -1 or x >= w:
    return np.zeros(img.shape[-1])
  y0, x0 = math.floor(y), math.floor(x)
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * _pixel(img, y0, x0) + (1 - ly) * lx * _pixel(img, y0, x0 + 1)
          + ly * (1 - lx) * _pixel(img, y0 + 1, x0) + ly * lx * _pixel(img, y0 + 1, x0 + 1))


def _bilinear_grad(img, y, x):
  """(d/dy, d/dx) of the value: torchvision's get_coordinate_weight (no range check)."""
  y0, x0 = math.floor(y), math.floor(x)
  ly, lx = y - y0, x - x0
  v00, v01 = _pixel(img, y0, x0), _pixel(img, y0, x0 + 1)
  v10, v11 = _pixel(img, y0 + 1, x0), _pixel(img, y0 + 1, x0 + 1)
  return lx * (v11 - v01) + (1 - lx) * (v10 - v00), ly * (v11 - v10) + (1 - ly) * (v01 - v00)


def _scatter_bilinear(grad_img, y, x, values):
  """Adds values * bilinear weight to the pixels around (y, x): torchvision's col2im."""
  h, w, _ = grad_img.shape
  for yp in range(int(y) - 1, int(y) + 2):
    for xp in range(int(x) - 1, int(x) + 2):
      if 0 <= yp < h and 0 <= xp < w and abs(y - yp) < 1 and abs(x - xp) < 1:
        grad_img[yp, xp] += (1 - abs(y - yp)) * (1 - abs(x - xp)) * values


def reference(x, offset, mask, kernel, grad_out, stride, padding, dilation, dg, groups):
  """Output and gradients of sum(out * grad_out) w.r.t. x, offset, mask, kernel (float64)."""
  x, offset, kernel, grad_out = (np.asarray(a, np.float64) for a in (x, offset, kernel, grad_out))
  b, h, w, cin = x.shape
  kh, kw, cin_g, cout = kernel.shape
  k, cg, cout_g = kh * kw, cin // dg, cout // groups
  mask = np.ones(offset.shape[:3] + (dg * k,)) if mask is None else np.asarray(mask, np.float64)
  ho, wo = offset.shape[1:3]
  out = np.zeros((b, ho, wo, cout))
  grads = [np.zeros_like(x), np.zeros_like(offset), np.zeros_like(mask), np.zeros_like(kernel)]
  for n, i, j in np.ndindex(b, ho, wo):
    cols = np.zeros((kh, kw, cin))  # masked samples of this output pixel
    for g, ki, kj in np.ndindex(dg, kh, kw):
      p = ki * kw + kj
      dy, dx = offset[n, i, j, g * 2 * k + 2 * p], offset[n, i, j, g * 2 * k + 2 * p + 1]
      m = mask[n, i, j, g * k + p]
      y = i * stride[0] - padding[0] + ki * dilation[0] + dy
      xx = j * stride[1] - padding[1] + kj * dilation[1] + dx
      img = x[n, :, :, g * cg:(g + 1) * cg]
      val = _bilinear(img, y, xx)
      cols[ki, kj, g * cg:(g + 1) * cg] = m * val
      # Gradient of the columns of this sample: sum over the outputs of its conv group.
      gcol = np.zeros(cg)
      for c in range(g * cg, (g + 1) * cg):
        grp = c // cin_g
        gcol[c - g * cg] = kernel[ki, kj, c - grp * cin_g, grp * cout_g:(grp + 1) * cout_g] @ \
            grad_out[n, i, j, grp * cout_g:(grp + 1) * cout_g]
      grad_y, grad_x = _bilinear_grad(img, y, xx)
      grads[1][n, i, j, g * 2 * k + 2 * p] = m * grad_y @ gcol
      grads[1][n, i, j, g * 2 * k + 2 * p + 1] = m * grad_x @ gcol
      grads[2][n, i, j, g * k + p] = val @ gcol
      _scatter_bilinear(grads[0][n, :, :, g * cg:(g + 1) * cg], y, xx, m * gcol)
    for grp in range(groups):
      cin_sl, cout_sl = slice(grp * cin_g, (grp + 1) * cin_g), slice(grp * cout_g, (grp + 1) * cout_g)
      out[n, i, j, cout_sl] = np.einsum("abc,abco->o", cols[:, :, cin_sl], kernel[..., cout_sl])
      grads[3][..., cout_sl] += np.einsum("abc,o->abco", cols[:, :, cin_sl],
                                          grad_out[n, i, j, cout_sl])
  return out, grads


# ------------------------------------------------------------------------------------------
# Cases: (B, H, W, Cin, Cout, (kh, kw), stride, padding, dilation, deform_groups, groups, kind)

CASES = {
    # everything combined; some offsets point far outside the image
    "combined": (2, 6, 7, 4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2, 2, "far"),
    # exact integer offsets (samples on pixel centres, at y = -1 and y = H, outside)
    "integer": (1, 5, 6, 3, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "integer"),
    # DCNv1 (no mask), 4 deform groups of one channel each, stride 2
    "no_mask": (1, 7, 6, 4, 3, (3, 3), (2, 2), (2, 1), (2, 1), 4, 1, "nomask"),
}


def _make_case(name):
  b, h, w, cin, cout, (kh, kw), stride, padding, dilation, dg, groups, kind = CASES[name]
  rng = np.random.default_rng(list(CASES).index(name))
  ho = output_size(h, kh, stride[0], padding[0], dilation[0])
  wo = output_size(w, kw, stride[1], padding[1], dilation[1])
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  offset = rng.uniform(-2.5, 2.5, (b, ho, wo, dg * kh * kw * 2))
  if kind == "far":
    offset = np.where(rng.uniform(size=offset.shape) < 0.2, 25 * offset, offset)
  if kind == "integer":
    offset = np.round(offset)
  mask = None if kind == "nomask" else rng.uniform(size=(b, ho, wo, dg * kh * kw))
  kernel = rng.standard_normal((kh, kw, cin // groups, cout)).astype(np.float32)
  grad_out = rng.standard_normal((b, ho, wo, cout)).astype(np.float32)
  conf = dict(stride=stride, padding=padding, dilation=dilation, deform_groups=dg, groups=groups)
  f32 = lambda a: None if a is None else np.asarray(a, np.float32)
  return (x, f32(offset), f32(mask), kernel, grad_out), conf


def _close(actual, expected, rtol=1e-5, what=""):
  """Agreement relative to the largest reference magnitude (float32 vs float64)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, what
  assert np.all(np.isfinite(actual)), what
  scale = max(np.abs(expected).max(), 1e-3)
  np.testing.assert_allclose(actual / scale, expected / scale, rtol=0, atol=rtol, err_msg=what)


_COMPILED = {}


def _output_and_grads(conf, no_mask=False):
  """jit(x, offset, mask, kernel, grad_out -> out, (grad_x, grad_offset, grad_mask, grad_kernel))."""
  key = (repr(sorted(conf.items())), no_mask)
  if key not in _COMPILED:
    _COMPILED[key] = _make_output_and_grads(conf, no_mask)
  return _COMPILED[key]


def _make_output_and_grads(conf, no_mask):
  def run(x, offset, mask, kernel, grad_out):
    if no_mask:
      out, vjp = jax.vjp(lambda x, o, k: deform_conv2d(x, o, None, k, **conf), x, offset, kernel)
      grad_x, grad_offset, grad_kernel = vjp(grad_out)
      return out, (grad_x, grad_offset, None, grad_kernel)
    out, vjp = jax.vjp(lambda *a: deform_conv2d(*a, **conf), x, offset, mask, kernel)
    return out, vjp(grad_out)
  return jax.jit(run)


@pytest.fixture(scope="module", params=[(name, all_points) for name in CASES
                                        for all_points in (False, True)],
                ids=lambda p: f"{p[0]}-{'all_points' if p[1] else 'scan'}")
def case(request):
  """Inputs, config, jax output and gradients, reference output and gradients of one case, for
  both implementations (one kernel point at a time, all at once)."""
  name, all_points = request.param
  (x, offset, mask, kernel, grad_out), conf = _make_case(name)
  conf["all_points"] = all_points

  out, grads = _output_and_grads(conf, mask is None)(x, offset, mask, kernel, grad_out)
  ref_out, ref_grads = reference(x, offset, mask, kernel, grad_out, conf["stride"],
                                 conf["padding"], conf["dilation"], conf["deform_groups"],
                                 conf["groups"])
  return dict(name=name, inputs=(x, offset, mask, kernel, grad_out), conf=conf,
              out=out, grads=grads, ref_out=ref_out, ref_grads=ref_grads)


def test_forward_matches_loop_reference(case):
  _close(case["out"], case["ref_out"])


def test_gradients_match_loop_reference(case):
  names = ("input", "offset", "mask", "kernel")
  for name, grad, ref in zip(names, case["grads"], case["ref_grads"]):
    if grad is not None:  # DCNv1 has no mask
      _close(grad, ref, what=name)


def test_offset_gradient_is_the_derivative_of_the_reference(case):
  """Forward differences of the float64 reference at random offsets.  The bilinear sample is
  linear in y (and x) within a pixel cell, so a forward difference of 1e-6 is the one-sided
  derivative that torchvision defines (exact also at integer positions)."""
  x, offset, mask, kernel, grad_out = case["inputs"]
  conf = case["conf"]
  args = (conf["stride"], conf["padding"], conf["dilation"], conf["deform_groups"],
          conf["groups"])
  f = lambda o: np.vdot(reference(x, o, mask, kernel, grad_out, *args)[0], grad_out)
  rng = np.random.default_rng(1)
  offset64 = offset.astype(np.float64)
  eps = 1e-6
  scale = max(np.abs(case["ref_grads"][1]).max(), 1e-3)
  for flat in rng.choice(offset.size, 8, replace=False):
    idx = np.unravel_index(flat, offset.shape)
    plus = offset64.copy()
    plus[idx] += eps
    numeric = (f(plus) - f(offset64)) / eps
    assert abs(float(case["grads"][1][idx]) - numeric) / scale < 1e-4


def test_integer_positions_have_finite_one_sided_gradients():
  """Zero and integer offsets put samples exactly on pixels, at y = -1 and y = H (padding 1):
  the gradients are finite and equal the forward difference (torchvision's convention)."""
  (x, offset, mask, kernel, grad_out), conf = _make_case("integer")
  run = _output_and_grads(conf)
  for off in (np.zeros_like(offset), offset):
    _, grads = run(x, off, mask, kernel, grad_out)
    _, ref_grads = reference(x, off, mask, kernel, grad_out, conf["stride"], conf["padding"],
                             conf["dilation"], 1, 1)
    for g, r in zip(grads, ref_grads):
      _close(g, r)


# ------------------------------------------------------------------------------------------
# Zero offsets and a mask of ones: an ordinary convolution.

@pytest.mark.parametrize("kernel_size,stride,padding,dilation,groups,dg", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, 2),
    ((3, 2), (2, 1), (0, 2), (1, 3), 2, 1),
    ((1, 1), (2, 2), (0, 0), (1, 1), 1, 4),
])
def test_zero_offsets_equal_lax_conv(kernel_size, stride, padding, dilation, groups, dg):
  rng = np.random.default_rng(0)
  kh, kw = kernel_size
  b, h, w, cin, cout = 2, 9, 8, 8, 6
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  kernel = rng.standard_normal((kh, kw, cin // groups, cout)).astype(np.float32)
  ho = output_size(h, kh, stride[0], padding[0], dilation[0])
  wo = output_size(w, kw, stride[1], padding[1], dilation[1])
  offset = np.zeros((b, ho, wo, dg * kh * kw * 2), np.float32)
  mask = np.ones((b, ho, wo, dg * kh * kw), np.float32)
  out = deform_conv2d(x, offset, mask, kernel, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, deform_groups=dg)
  expected = jax.lax.conv_general_dilated(
      x, kernel, stride, [(p, p) for p in padding], rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      precision="highest")
  assert out.shape == expected.shape == (b, ho, wo, cout)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Hand-worked border cases: one channel, a 1x1 kernel of weight 1, no padding, so the output
# is the input sampled at (i + dy, j + dx).

@pytest.mark.parametrize("dy,dx,expected", [
    (0.0, 0.0, lambda x: x[1, 2]),
    (0.25, 0.5, lambda x: 0.75*(0.5*x[1, 2] + 0.5*x[1, 3]) + 0.25*(0.5*x[2, 2] + 0.5*x[2, 3])),
    (-1.5, 0.0, lambda x: 0.5 * x[0, 2]),          # y = -0.5: the upper neighbour is outside
    (-2.0, 0.0, lambda x: 0.0),                    # y = -1: nothing
    (-2.5, 0.0, lambda x: 0.0),                    # y = -1.5: nothing
    (2.5, 0.0, lambda x: 0.5 * x[3, 2]),           # y = H - 0.5
    (3.0, 0.0, lambda x: 0.0),                     # y = H
    (0.0, -2.75, lambda x: 0.25 * x[1, 0]),        # x = -0.75
    (0.0, 1.5, lambda x: 0.5 * x[1, 3]),           # x = W - 0.5
    (-1.5, 1.5, lambda x: 0.25 * x[0, 3]),         # corner: one neighbour of four inside
])
def test_border_sampling_by_hand(dy, dx, expected):
  x = np.arange(1, 17, dtype=np.float32).reshape(4, 4)  # H = W = 4
  offset = np.zeros((1, 4, 4, 2), np.float32)
  offset[0, 1, 2] = dy, dx  # output pixel (1, 2)
  out = deform_conv2d(x[None, :, :, None], offset, None, np.ones((1, 1, 1, 1), np.float32),
                      padding=0)
  np.testing.assert_allclose(out[0, 1, 2, 0], expected(x), rtol=1e-6)


def test_bad_arguments_raise_value_errors():
  x = np.zeros((1, 5, 5, 4), np.float32)
  kernel = np.zeros((3, 3, 4, 2), np.float32)
  offset = np.zeros((1, 5, 5, 18), np.float32)
  mask = np.zeros((1, 5, 5, 9), np.float32)
  deform_conv2d(x, offset, mask, kernel)  # valid
  with pytest.raises(ValueError, match="offset"):
    deform_conv2d(x, offset[..., :17], mask, kernel)
  with pytest.raises(ValueError, match="mask"):
    deform_conv2d(x, offset, mask[..., :8], kernel)
  with pytest.raises(ValueError, match="deform_groups"):
    deform_conv2d(x, offset, mask, kernel, deform_groups=3)
  with pytest.raises(ValueError, match="groups"):
    deform_conv2d(x, offset, mask, np.zeros((3, 3, 4, 3), np.float32), groups=2)
  with pytest.raises(ValueError, match="x must be"):
    deform_conv2d(x[0], offset, mask, kernel)
  with pytest.raises(ValueError, match="stride"):
    deform_conv2d(x, offset, mask, kernel, stride=0)
  with pytest.raises(ValueError, match="too small"):
    deform_conv2d(x[:, :1, :1], offset, mask, kernel, padding=0)


# ------------------------------------------------------------------------------------------
# The Flax layer.  (Random parameters come from numpy: compiling jax.random for every shape
# would dominate this file's run time.)

def _random_params(module, x, rng):
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  return jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_layer_parameters_match_mmcv_nasfcos_head_dcn():
  """NAS-FCOS's head DCN: 256 -> 256, 3x3, padding 1, deform_groups 2, bias (mmcv names
  weight, bias, conv_offset.weight, conv_offset.bias)."""
  layer = ModulatedDeformConv2dPack(256, kernel_size=3, padding=1, deform_groups=2)
  params = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 8, 8, 256)))["params"]
  shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
  assert shapes == {"kernel": (3, 3, 256, 256), "bias": (256,),
                    "conv_offset": {"kernel": (3, 3, 256, 54), "bias": (54,)}}
  assert sum(math.prod(s) for s in jax.tree_util.tree_leaves(
      shapes, is_leaf=lambda s: isinstance(s, tuple))) == 714_550


def test_layer_initial_state_is_a_half_strength_conv():
  """conv_offset starts at zero: offsets 0 and mask sigmoid(0) = 0.5, as mmcv."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 5, 8)).astype(np.float32)
  layer = ModulatedDeformConv2dPack(4, kernel_size=3, padding=1, deform_groups=2)
  # An 'rbg' key: threefry's compile takes seconds per shape on CPU.
  params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), x)["params"]
  assert not np.any(params["conv_offset"]["kernel"]) and not np.any(params["conv_offset"]["bias"])
  bound = 1 / math.sqrt(8 * 9)  # mmcv's uniform init of the DCN weight
  assert np.abs(params["kernel"]).max() <= bound
  assert np.abs(params["kernel"]).max() > 0.8 * bound
  params = dict(params, bias=rng.standard_normal(4).astype(np.float32))
  out = jax.jit(layer.apply)({"params": params}, x)
  conv = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")
  np.testing.assert_allclose(out, 0.5 * conv + params["bias"], rtol=1e-5, atol=1e-5)


def test_layer_reads_offsets_and_mask_in_mmcv_chunk_order():
  """conv_offset's output is [dy dx pairs of group 0, of group 1, ..., mask logits]. With a
  zero kernel and a bias giving dx = +1 for group 0, dy = +1 for group 1, and mask logits of
  +30 (mask 1), the layer is a plain conv of the input shifted by one pixel per group."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 6, 7, 4)).astype(np.float32)
  layer = ModulatedDeformConv2dPack(3, kernel_size=3, padding=1, deform_groups=2,
                                    use_bias=False)
  params = _random_params(layer, x, rng)
  k = 9
  offset_bias = np.zeros(2 * k * 3, np.float32)
  offset_bias[0:2 * k:2] = 0.0   # group 0 dy
  offset_bias[1:2 * k:2] = 1.0   # group 0 dx
  offset_bias[2 * k:4 * k:2] = 1.0   # group 1 dy
  offset_bias[2 * k + 1:4 * k:2] = 0.0   # group 1 dx
  offset_bias[4 * k:] = 30.0   # mask logits
  params["conv_offset"] = dict(kernel=np.zeros((3, 3, 4, 54), np.float32), bias=offset_bias)
  out = layer.apply({"params": params}, x)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # the conv's zero padding, then shift
  shifted = np.zeros_like(padded)
  shifted[:, :, :-1, :2] = padded[:, :, 1:, :2]   # group 0 reads x + 1
  shifted[:, :-1, :, 2:] = padded[:, 1:, :, 2:]   # group 1 reads y + 1
  conv = jax.lax.conv_general_dilated(shifted, params["kernel"], (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")
  np.testing.assert_allclose(out, conv, rtol=1e-5, atol=1e-5)


def test_layer_jits_and_differentiates_inside_a_model():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = ModulatedDeformConv2dPack(4, kernel_size=3, padding=1, deform_groups=2)(x)
      return nn.Conv(2, (1, 1))(nn.relu(x))

  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  model = Tiny()
  params = {"params": _random_params(model, x, rng)}
  params["params"]["ModulatedDeformConv2dPack_0"]["conv_offset"]["kernel"][:] = 0  # as at init
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # With the offset conv at zero its kernel still receives a gradient: offsets can move.
  assert np.abs(grads["params"]["ModulatedDeformConv2dPack_0"]["conv_offset"]["kernel"]).max() > 0
