"""Speed and memory of jaxdet's deform_conv2d next to torchvision's kernel, same process.

NAS-FCOS head sizes by default: 256 -> 256 channels, 3x3, deform_groups 2, the P3 map of an
800x1216 image (100x152), batch 2; forward and forward+backward (gradients w.r.t. input,
offset, mask and weight), jit-compiled.  Prints one line per measurement.

  python experiments/bench_deform_conv.py                  # CPU: torch CPU kernel, jax on CPU
  python experiments/bench_deform_conv.py --device cuda    # GPU: torch CUDA kernel, jax on GPU

Needs only jax, numpy, torch and torchvision.  On CUDA, torch's TF32 is switched off and jax
uses precision 'highest' (pass --precision default to allow TF32 in both).

Peak memory: torch CUDA from torch.cuda.max_memory_allocated; torch CPU from a thread
sampling the process RSS (/proc/self/statm, Linux) minus the RSS before the call (coarse:
the allocator may keep freed pages); jax from the compiled executable's memory_analysis()
(temp = XLA's scratch buffers; args and outputs counted separately).
"""
import argparse
import os
import sys
import threading
import time

import numpy as np

# torch and jax share the GPU in this process: keep jax from reserving 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--height", type=int, default=100)
  p.add_argument("--width", type=int, default=152)
  p.add_argument("--channels", type=int, default=256)
  p.add_argument("--deform-groups", type=int, default=2)
  p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 CPU, 20 GPU)")
  p.add_argument("--precision", default="highest", choices=["highest", "default"])
  p.add_argument("--skip-torch", action="store_true")
  return p.parse_args()


class RssPeak:
  """Peak resident set size (bytes) above the value at entry, sampled every ~1 ms."""

  def __enter__(self):
    self._page = os.sysconf("SC_PAGE_SIZE")
    self.base = self._rss()
    self.peak = self.base
    self._stop = False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _rss(self):
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _run(self):
    while not self._stop:
      self.peak = max(self.peak, self._rss())
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()
    self.peak = max(self.peak, self._rss())
    self.delta = self.peak - self.base


def timed(fn, repeats, sync):
  fn()
  sync()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def make_inputs(args):
  rng = np.random.default_rng(0)
  b, h, w, c, dg = args.batch, args.height, args.width, args.channels, args.deform_groups
  x = rng.standard_normal((b, h, w, c), np.float32)
  offset = rng.uniform(-4, 4, (b, h, w, dg * 9 * 2)).astype(np.float32)
  mask = rng.uniform(0, 1, (b, h, w, dg * 9)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
  grad_out = rng.standard_normal((b, h, w, c), np.float32)
  return x, offset, mask, kernel, grad_out


def mib(n):
  return n / 2**20


def bench_torch(args, inputs, repeats):
  import torch
  import torchvision
  dev = torch.device(args.device)
  if args.device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "default"
    torch.backends.cudnn.allow_tf32 = args.precision == "default"
  x, offset, mask, kernel, grad_out = (torch.from_numpy(a).to(dev) for a in inputs)
  x, offset, mask, grad_out = (a.permute(0, 3, 1, 2).contiguous() for a in (x, offset, mask,
                                                                              grad_out))
  weight = kernel.permute(3, 2, 0, 1).contiguous()
  leaves = [a.requires_grad_() for a in (x, offset, mask, weight)]
  sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
  tag = f"torch {torch.__version__} torchvision {torchvision.__version__} {args.device}"
  if args.device == "cpu":
    tag += f" threads={torch.get_num_threads()}"

  def fwd():
    with torch.no_grad():
      return torchvision.ops.deform_conv2d(x, offset, weight, padding=(1, 1), mask=mask)

  def fwd_bwd():
    for a in leaves:
      a.grad = None
    out = torchvision.ops.deform_conv2d(x, offset, weight, padding=(1, 1), mask=mask)
    out.backward(grad_out)
    return [a.grad for a in leaves]

  for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
    if args.device == "cuda":
      fn()
      for a in leaves:
        a.grad = None
      sync()
      torch.cuda.reset_peak_memory_stats()
      base = torch.cuda.memory_allocated()
      ms = timed(fn, repeats, sync)
      mem = (f"peak {mib(torch.cuda.max_memory_allocated() - base):.0f} MiB above the inputs "
             f"(CUDA allocator)")
    else:
      fn()
      with RssPeak() as rss:
        ms = timed(fn, repeats, sync)
      mem = f"peak {mib(rss.delta):.0f} MiB above start (process RSS, sampled)"
    print(f"torchvision deform_conv2d {name:8s} {ms:9.1f} ms   {mem}   [{tag}]", flush=True)
  if args.device == "cuda":
    del x, offset, mask, weight, grad_out, leaves
    torch.cuda.empty_cache()


def bench_jax(args, inputs, repeats):
  import jax
  import jax.numpy as jnp
  from jaxdet.ops.deform_conv import deform_conv2d
  dev = jax.devices()[0]
  precision = "highest" if args.precision == "highest" else None
  x, offset, mask, kernel, grad_out = (jax.device_put(a, dev) for a in inputs)
  tag = f"jax {jax.__version__} {dev.platform} ({dev.device_kind})"

  def dcn(x, offset, mask, kernel):
    return deform_conv2d(x, offset, mask, kernel, padding=1, deform_groups=args.deform_groups,
                         precision=precision)

  def loss(x, offset, mask, kernel):
    return jnp.vdot(dcn(x, offset, mask, kernel), grad_out)

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)

  cases = (
      ("deform_conv2d fwd", jax.jit(dcn), (x, offset, mask, kernel)),
      ("deform_conv2d fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))),
       (x, offset, mask, kernel)),
      ("lax.conv (no deform) fwd", jax.jit(conv), (x, kernel)),
      ("lax.conv (no deform) fwd+bwd",
       jax.jit(jax.grad(lambda x, k: jnp.vdot(conv(x, k), grad_out), argnums=(0, 1))), (x, kernel)),
  )
  for name, fn, fn_args in cases:
    t0 = time.perf_counter()
    compiled = fn.lower(*fn_args).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = (f"temp {mib(ma.temp_size_in_bytes):.0f} MiB, args {mib(ma.argument_size_in_bytes):.0f}"
             f" MiB, out {mib(ma.output_size_in_bytes):.0f} MiB (XLA memory_analysis)")
    else:
      mem = "memory_analysis unavailable"
    ms = timed(lambda: jax.block_until_ready(compiled(*fn_args)), repeats, lambda: None)
    print(f"jaxdet {name:30s} {ms:9.1f} ms   {mem}   compile {compile_s:.1f} s   [{tag}]",
          flush=True)


def main():
  args = parse_args()
  repeats = args.repeats or (3 if args.device == "cpu" else 20)
  b, h, w, c = args.batch, args.height, args.width, args.channels
  im2col = b * h * w * 9 * c * 4
  print(f"# B={b} {h}x{w} {c}->{c} 3x3 pad 1 deform_groups={args.deform_groups}, "
        f"im2col = {mib(im2col):.0f} MiB, median of {repeats}, precision {args.precision}",
        flush=True)
  inputs = make_inputs(args)
  if not args.skip_torch:
    bench_torch(args, inputs, repeats)
  bench_jax(args, inputs, repeats)


if __name__ == "__main__":
  main()
