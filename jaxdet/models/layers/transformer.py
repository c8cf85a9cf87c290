"""DETR's transformer (Carion et al. 2020) as mmdetection 3.3 builds it: post-norm layers, NHWC-free
(sequences are (B, N, D), batch first).

- `MultiheadAttention`: mmcv's `MultiheadAttention` around `torch.nn.MultiheadAttention`:
  ``identity + Dropout(out_proj(softmax(q k^T / sqrt(d_head)) v))`` with ``q = query + query_pos``,
  ``k = key + key_pos``, ``v = value`` (no positional encoding on the values), padded keys
  (``key_padding_mask`` True) excluded, dropout ``p`` on the attention weights *and* on the
  residual branch (mmcv's ``dropout=`` sets both). The in-projection keeps torch's fused layout,
  one (D, 3D) kernel ``in_proj`` (Q, K, V columns in that order) with a (3D,) bias: mmdetection's
  xavier-uniform then has the fused bound sqrt(6 / (D + 3D)) (DETR: sqrt(6 / 1024)), which
  separate Q / K / V matrices would lose.
- `FFN`: mmcv's ``FFN``: Linear(D, F) -> ReLU -> Dropout -> Linear(F, D) -> Dropout, plus the
  identity (``add_identity``).
- `DetrEncoderLayer`: self-attention (q = k = x + pos, v = x, key padding mask) -> LN -> FFN -> LN.
- `DetrDecoderLayer`: self-attention over the queries (q = k = query + query_pos) -> LN ->
  cross-attention (q = query + query_pos, k = memory + memory_pos, v = memory, memory padding
  mask) -> LN -> FFN -> LN.
- `DetrEncoder` / `DetrDecoder`: stacks; the decoder applies one final LayerNorm (``post_norm``)
  to the output of *every* layer and returns all of them, (L, B, Q, D).

Initialisation as mmdetection's `DETR.init_weights`: xavier-uniform on every matrix of the
encoder and decoder; attention biases 0 (torch's MultiheadAttention); FFN biases torch's Linear
default U(+-1/sqrt(fan_in)); LayerNorm 1 / 0 (eps 1e-5, torch's). Dropout draws from the
'dropout' rng collection when `train=True`.

Parameter names follow mmdetection's (`layers_0/self_attn/in_proj`, `.../out_proj`,
`.../ffn/layers_0_0`, `.../ffn/layers_1`, `.../norms_0`, `post_norm`) so a converted checkpoint maps
one to one (`encoder.layers.0.self_attn.attn.in_proj_weight` -> `encoder/layers_0/self_attn/in_proj/
kernel`, transposed).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # torch.nn.LayerNorm's default
xavier_uniform = nn.initializers.xavier_uniform()


def torch_linear_bias_init(fan_in):
  """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1. / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# torch.nn.Linear's default weight init (kaiming_uniform(a=sqrt(5))): U(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1. / 3, 'fan_in', 'uniform')


class _InProjection(nn.Module):
  """torch's fused in-projection: one (D, 3D) kernel and (3D,) bias; Q, K, V are its thirds."""
  embed_dims: int
  dtype: Any = None

  @nn.compact
  def __call__(self, q, k, v):
    d = self.embed_dims
    kernel = self.param('kernel', xavier_uniform, (d, 3 * d), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (3 * d,), jnp.float32)
    dt = self.dtype or jnp.float32
    kernel, bias = kernel.astype(dt), bias.astype(dt)
    return tuple(x.astype(dt) @ kernel[:, i * d:(i + 1) * d] + bias[i * d:(i + 1) * d]
                 for i, x in enumerate((q, k, v)))


class MultiheadAttention(nn.Module):
  """mmcv's MultiheadAttention (see the module docstring).

  Call: query (B, Nq, D), key / value (B, Nk, D), query_pos (B or 1, Nq, D) or None, key_pos
  (B, Nk, D) or None, key_padding_mask (B, Nk) bool (True = padded) or None -> (B, Nq, D).
  """
  embed_dims: int = 256
  num_heads: int = 8
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, query, key, value, *, query_pos=None, key_pos=None,
               key_padding_mask=None, train: bool = False):
    d, h = self.embed_dims, self.num_heads
    if d % h:
      raise ValueError(f'embed_dims={d} must be divisible by num_heads={h}')
    identity = query
    q_in = query if query_pos is None else query + query_pos
    k_in = key if key_pos is None else key + key_pos
    q, k, v = _InProjection(d, dtype=self.dtype, name='in_proj')(q_in, k_in, value)
    split = lambda x: x.reshape(x.shape[:2] + (h, d // h))
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum('bqhc,bkhc->bhqk', q * (d // h) ** -0.5, k).astype(jnp.float32)
    if key_padding_mask is not None:
      logits = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, logits)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights.astype(v.dtype), v)
    out = out.reshape(out.shape[:2] + (d,))
    out = nn.Dense(d, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                   dtype=self.dtype, name='out_proj')(out)
    return identity + nn.Dropout(self.dropout, deterministic=not train)(out)


class FFN(nn.Module):
  """mmcv's FFN with two layers: x (+ identity) of Linear(D, F) -> ReLU -> Dropout ->
  Linear(F, D) -> Dropout. `kernel_init` None = xavier-uniform (the transformer's); the head's
  regression FFN passes torch's Linear default."""
  embed_dims: int = 256
  feedforward_channels: int = 2048
  dropout: float = 0.1
  add_identity: bool = True
  kernel_init: Callable = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    kinit = self.kernel_init or xavier_uniform
    y = nn.Dense(self.feedforward_channels, kernel_init=kinit,
                 bias_init=torch_linear_bias_init(self.embed_dims), dtype=self.dtype,
                 name='layers_0_0')(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(y))
    y = nn.Dense(self.embed_dims, kernel_init=kinit,
                 bias_init=torch_linear_bias_init(self.feedforward_channels), dtype=self.dtype,
                 name='layers_1')(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + y if self.add_identity else y


def _layer_norm(name, dtype):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class DetrEncoderLayer(nn.Module):
  """x (B, N, D), pos (B, N, D), key_padding_mask (B, N) -> (B, N, D)."""
  embed_dims: int = 256
  num_heads: int = 8
  feedforward_channels: int = 2048
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, x, pos, key_padding_mask, train: bool = False):
    x = MultiheadAttention(self.embed_dims, self.num_heads, self.dropout, dtype=self.dtype,
                           name='self_attn')(x, x, x, query_pos=pos, key_pos=pos,
                                             key_padding_mask=key_padding_mask, train=train)
    x = _layer_norm('norms_0', self.dtype)(x)
    x = FFN(self.embed_dims, self.feedforward_channels, self.dropout, dtype=self.dtype,
            name='ffn')(x, train=train)
    return _layer_norm('norms_1', self.dtype)(x)


class DetrDecoderLayer(nn.Module):
  """query (B, Q, D), query_pos (B or 1, Q, D), memory (B, N, D), memory_pos (B, N, D),
  memory_mask (B, N) -> (B, Q, D)."""
  embed_dims: int = 256
  num_heads: int = 8
  feedforward_channels: int = 2048
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, query, query_pos, memory, memory_pos, memory_mask, train: bool = False):
    attn = lambda name: MultiheadAttention(self.embed_dims, self.num_heads, self.dropout,
                                           dtype=self.dtype, name=name)
    query = attn('self_attn')(query, query, query, query_pos=query_pos, key_pos=query_pos,
                              train=train)
    query = _layer_norm('norms_0', self.dtype)(query)
    query = attn('cross_attn')(query, memory, memory, query_pos=query_pos, key_pos=memory_pos,
                               key_padding_mask=memory_mask, train=train)
    query = _layer_norm('norms_1', self.dtype)(query)
    query = FFN(self.embed_dims, self.feedforward_channels, self.dropout, dtype=self.dtype,
                name='ffn')(query, train=train)
    return _layer_norm('norms_2', self.dtype)(query)


class DetrEncoder(nn.Module):
  """`num_layers` encoder layers: x (B, N, D), pos, key_padding_mask -> memory (B, N, D)."""
  num_layers: int = 6
  embed_dims: int = 256
  num_heads: int = 8
  feedforward_channels: int = 2048
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, x, pos, key_padding_mask, train: bool = False):
    for i in range(self.num_layers):
      x = DetrEncoderLayer(self.embed_dims, self.num_heads, self.feedforward_channels,
                           self.dropout, dtype=self.dtype, name=f'layers_{i}')(
                               x, pos, key_padding_mask, train=train)
    return x


class DetrDecoder(nn.Module):
  """`num_layers` decoder layers; returns post_norm(output of each layer): (L, B, Q, D)."""
  num_layers: int = 6
  embed_dims: int = 256
  num_heads: int = 8
  feedforward_channels: int = 2048
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, query, query_pos, memory, memory_pos, memory_mask, train: bool = False):
    post_norm = _layer_norm('post_norm', self.dtype)
    outputs = []
    for i in range(self.num_layers):
      query = DetrDecoderLayer(self.embed_dims, self.num_heads, self.feedforward_channels,
                               self.dropout, dtype=self.dtype, name=f'layers_{i}')(
                                   query, query_pos, memory, memory_pos, memory_mask, train=train)
      outputs.append(post_norm(query))
    return jnp.stack(outputs)
