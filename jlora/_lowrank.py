"""The LoRA matmul ``x W0 + s (x A) B`` on 2-D operands.

Every adapted matmul is brought to this one shape, (M, K) @ (K, N), so the
three dots are in the layouts the backends run natively, and the low-rank
path costs 2Mr(K+N) FLOPs beside the 2MKN of the base. Plain autodiff gives
the backward: W0 is never differentiated, so JAX emits no dW0, and a
hand-written custom VJP measured no faster on XLA:CPU (train-step ratio 0.69
against 0.66 without it) while it would rule out forward-mode AD
(``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))   # (M, K) @ (K, N)


def lora_matmul(x: jax.Array, x_lora: jax.Array, w0: jax.Array, a: jax.Array,
                b: jax.Array, scale: float, out_dtype: Any) -> jax.Array:
  """Returns ``x @ w0 + scale * (x_lora @ a) @ b`` for 2-D operands.

  ``x_lora`` is ``x`` after LoRA dropout (or ``x`` itself). The low-rank
  path runs in the factors' dtype, as PEFT does, and is added to the base
  output in ``out_dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> x, w0 = jnp.ones((2, 3)), jnp.zeros((3, 4))
    >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 4))
    >>> lora_matmul(x, x, w0, a, b, 0.5, jnp.float32)[0].tolist()
    [1.5, 1.5, 1.5, 1.5]
  """
  base = lax.dot_general(x, w0, _NN, preferred_element_type=out_dtype)
  xa = lax.dot_general(x_lora.astype(a.dtype), a, _NN)
  low = lax.dot_general(xa, b, _NN) * jnp.asarray(scale, a.dtype)
  return (base + low.astype(base.dtype)).astype(out_dtype)
