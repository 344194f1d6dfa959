"""Initialisations from W0 that move part of it into the adapter: PiSSA,
OLoRA, LoftQ.

Each returns the factors and the *residual* base the adapter is trained
against, with ``W0 = residual + s B A``, so the adapted model starts equal
to the original. The math is PEFT's (``init_lora_weights="pissa"``,
``"pissa_niter_N"``, ``"olora"``), in jlora's (in, out) terms: a weight is
handled as its ``(fan_in, fan_out)`` matrix, per slice of its stack axes.

* PiSSA: the top r singular triplets of W0, ``A = U_r sqrt(S_r / s)``,
  ``B = sqrt(S_r / s) V_r^T``; ``"pissa_niter_N"`` finds them by a randomized
  SVD with N subspace iterations, for large layers.
* OLoRA: a QR decomposition of W0's PyTorch-layout transpose,
  ``W0^T = Q R``: ``A = R_r^T``, ``B = Q_r^T``.
* LoftQ (Li et al., 2023): for a base stored in NF4, alternately quantize
  ``W0 - s B A`` and take ``s B A`` as the top r singular triplets of
  ``W0 - dequantize(Q)``, so the quantized base plus the adapter start close
  to W0; ``"loftq_iter_N"`` runs N rounds (``"loftq"``: one, PEFT's default).
  The frozen base becomes the NF4Array ``Q``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora.layout import Layout

_NITER = re.compile(r"pissa_niter_(\d+)")
_LOFTQ = re.compile(r"loftq(?:_iter_([1-9]\d*))?")


def is_base_changing(init: str) -> bool:
  """Whether an init moves part of W0 into the adapter (returns a residual)."""
  return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None or is_loftq(init)


def is_loftq(init: str) -> bool:
  return _LOFTQ.fullmatch(init) is not None


def valid(init: str) -> bool:
  return init in ("default", "gaussian") or is_base_changing(init)


def pissa(w: jax.Array, rank: int, scale: float, key: jax.Array | None = None,
          niter: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a, b, residual)`` of a (fan_in, fan_out) matrix, by PiSSA.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> a, b, res = pissa(w, 1, 1.0)
    >>> float(jnp.abs(res + a @ b - w).max()) < 1e-6, float(jnp.abs(res).max())
    (True, 2.0)
  """
  w = w.astype(jnp.float32)
  if niter is None:
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
  else:
    u, s, vt = _randomized_svd(w, rank, niter, key)
  root = jnp.sqrt(s / scale)
  a = u * root[None, :]
  b = root[:, None] * vt
  return a, b, w - scale * (a @ b)


def _randomized_svd(w: jax.Array, rank: int, niter: int, key: jax.Array):
  """The top ``rank`` singular triplets from a random range finder with
  ``niter`` subspace iterations (Halko, Martinsson and Tropp), on ``w^T`` as
  PyTorch's ``svd_lowrank`` runs it on PEFT's (out, in) weight."""
  m = w.T                                             # (out, in), PyTorch's weight
  q, _ = jnp.linalg.qr(m @ jax.random.normal(key, (m.shape[1], rank), m.dtype))
  for _ in range(niter):
    q, _ = jnp.linalg.qr(m.T @ q)
    q, _ = jnp.linalg.qr(m @ q)
  small_u, s, vt = jnp.linalg.svd(q.T @ m, full_matrices=False)
  v_out = q @ small_u                                 # (out, rank): m's left vectors
  return vt.T, s, v_out.T                              # w = m^T = vt^T s v_out^T


def olora(w: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a, b, residual)`` of a (fan_in, fan_out) matrix, by OLoRA.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> a, b, res = olora(w, 1, 2.0)
    >>> float(jnp.abs(res + 2.0 * a @ b - w).max()) < 1e-6
    True
  """
  w = w.astype(jnp.float32)
  q, r = jnp.linalg.qr(w.T)                           # PyTorch's (out, in) = Q R
  a, b = r[:rank].T, q[:, :rank].T
  return a, b, w - scale * (a @ b)


def loftq(init: str, w0: jax.Array, layout: Layout, rank: int, scale: float,
          dtype: Any, block_size: int = 64, double_quant: bool = True):
  """``(a, b, q)``: factors in ``dtype`` and the NF4Array base, by LoftQ.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))
    >>> a, b, q = loftq("loftq_iter_2", w, Layout((0,), (1,)), 8, 1.0, jnp.float32)
    >>> base = jnp.abs(q.dequantize(jnp.float32) - w).mean()
    >>> bool(jnp.abs(q.dequantize(jnp.float32) + a @ b - w).mean() < base)
    True
  """
  from jlora.lora_param import lowrank_product
  from jlora.quant.nf4 import quantize_array
  rounds = int(_LOFTQ.fullmatch(init).group(1) or 1)
  w = jnp.asarray(w0, jnp.float32)
  res = w
  for _ in range(rounds):
    q = quantize_array(res.astype(w0.dtype), layout, block_size=block_size,
                       double_quant=double_quant)
    a, b, _ = from_base("pissa", w - q.dequantize(jnp.float32), layout, rank, scale,
                        jax.random.key(0), dtype)
    res = w - lowrank_product(a, b, scale, layout)
  return a, b, q


def from_base(init: str, w0: jax.Array, layout: Layout, rank: int, scale: float,
              key: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a, b, residual)`` for a weight of any layout, per slice of its stack
  axes: factors in ``dtype``, the residual in W0's dtype and axis order."""
  lay, shape = layout, w0.shape
  order = lay.stack_axes + lay.in_axes + lay.out_axes
  stack = tuple(shape[i] for i in lay.stack_axes)
  ins = tuple(shape[i] for i in lay.in_axes)
  outs = tuple(shape[i] for i in lay.out_axes)
  mats = jnp.transpose(w0, order).reshape((-1, math.prod(ins), math.prod(outs)))
  niter = _NITER.fullmatch(init)
  if init == "olora":
    one = lambda m, k: olora(m, rank, scale)  # noqa: E731
  else:
    one = lambda m, k: pissa(m, rank, scale, k, None if niter is None else int(niter.group(1)))  # noqa
  keys = jax.random.split(key, mats.shape[0])
  a, b, res = jax.vmap(one)(mats, keys)
  a = a.reshape(stack + ins + (rank,)).astype(dtype)
  b = b.reshape(stack + (rank,) + outs).astype(dtype)
  res = res.reshape(stack + ins + outs)
  inverse = [order.index(axis) for axis in range(len(order))]
  return a, b, jnp.transpose(res, inverse).astype(w0.dtype)
