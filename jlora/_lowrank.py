"""The LoRA matmul ``x W0 + s (x A) B`` with a hand-written backward.

Plain autodiff of this expression is correct, but XLA:CPU then fuses the
elementwise parts of the backward into slow transposing copies (measured at
1.28x the full fine-tune step). The rule below keeps every backward dot in
a layout that the backends run natively, and never forms dW0 unless the
caller differentiates with respect to W0 (XLA removes it otherwise).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))   # (M, K) @ (K, N)
_NT = (((1,), (1,)), ((), ()))   # (M, K) @ (N, K)^T
_TN = (((0,), (0,)), ((), ()))   # (K, M)^T @ (K, N)


def _dot(x, y, dims, dtype=None):
  return lax.dot_general(x, y, dims, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def lora_matmul(x: jax.Array, x_lora: jax.Array, w0: jax.Array, a: jax.Array,
                b: jax.Array, scale: float, out_dtype: Any) -> jax.Array:
  """Returns ``x @ w0 + scale * (x_lora @ a) @ b`` for 2-D operands.

  ``x_lora`` is ``x`` after LoRA dropout (or ``x`` itself). The low-rank
  path runs in the factors' dtype, as PEFT does, and is added to the base
  output in ``out_dtype``.
  """
  y, _ = _fwd(x, x_lora, w0, a, b, scale, out_dtype)
  return y


def _fwd(x, x_lora, w0, a, b, scale, out_dtype):
  base = _dot(x, w0, _NN, out_dtype)
  xa = _dot(x_lora.astype(a.dtype), a, _NN)
  low = _dot(xa, b, _NN) * jnp.asarray(scale, a.dtype)
  y = (base + low.astype(base.dtype)).astype(out_dtype)
  return y, (x, x_lora, w0, a, b, xa)


def _bwd(scale, out_dtype, res, g):
  x, x_lora, w0, a, b, xa = res
  del out_dtype
  g_low = g.astype(a.dtype) * jnp.asarray(scale, a.dtype)
  grad_b = _dot(xa, g_low, _TN)                         # (r, N)
  grad_xa = _dot(g_low, b, _NT)                         # (M, r)
  grad_a = _dot(x_lora.astype(a.dtype), grad_xa, _TN)   # (K, r)
  grad_x_lora = _dot(grad_xa, a, _NT).astype(x_lora.dtype)
  grad_x = _dot(g.astype(w0.dtype), w0, _NT, x.dtype).astype(x.dtype)
  # Dead unless the caller differentiates W0 itself; XLA then drops it.
  grad_w0 = _dot(x.astype(w0.dtype), g.astype(w0.dtype), _TN).astype(w0.dtype)
  return grad_x, grad_x_lora, grad_w0, grad_a.astype(a.dtype), grad_b.astype(b.dtype)


lora_matmul.defvjp(_fwd, _bwd)
