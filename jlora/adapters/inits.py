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

from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.errors import LoraTreeError
from jlora.layout import Layout
from jlora.adapters.lora_param import LoraParam

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
  from jlora.adapters.lora_param import lowrank_product
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


def relative_to_original(trainable: Any, initial: Any) -> Any:
  """An adapter made by a base-changing init, made relative to the original weights.

  PiSSA and OLoRA train against a residual ``R = W - s B0 A0`` (``frozen``),
  so the trained ``R + s B A`` is ``W + s (B A - B0 A0)``: a plain LoRA
  adapter of the original ``W`` with rank ``2r``, ``A' = [A; A0]`` and
  ``B' = [B, -B0]`` at the same scale. PEFT writes the same conversion
  (``save_pretrained(path_initial_model_for_weight_conversion=...)``). The
  result can be saved for, loaded onto and merged into the original weights.

  Args:
    trainable: the trained tree (``LoraParam`` leaves with ``residual`` set).
    initial: the trainable tree ``lora_transform`` returned, before training
      (the initial factors ``A0``, ``B0``).

  Returns:
    A trainable tree with a rank-2r ``LoraParam`` (``residual=None``) at each
    weight that was relative to a residual; other leaves as in ``trainable``.

  Raises:
    LoraTreeError: the trees differ, a DoRA adapter (its magnitude is relative
      to the residual's norms: no plain LoRA form exists), a LoftQ adapter (its
      quantized base is not exactly the original minus the initial update),
      or ``initial`` does not match ``trainable`` (another init, rank, scale
      or layout).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> w = jax.random.normal(jax.random.key(0), (8, 6))
    >>> spec = jlora.LoraSpec(rank=2, targets=["w"], init="pissa")
    >>> residual, t0 = jlora.lora_transform({"w": w}, spec, key=jax.random.key(1))
    >>> t = jax.tree.map(lambda x: x * 1.5, t0)                   # "trained"
    >>> plain = jlora.relative_to_original(t, t0)
    >>> plain["w"].rank, plain["w"].residual
    (4, None)
    >>> bool(jnp.allclose(jlora.merge({"w": w}, plain)["w"], jlora.merge(residual, t)["w"],
    ...                   atol=1e-5))
    True
  """
  t_pairs, t_def = flatten_with_paths(trainable, is_leaf=is_adapter)
  i_pairs, i_def = flatten_with_paths(initial, is_leaf=is_adapter)
  if t_def != i_def:
    raise LoraTreeError("relative_to_original: trainable and initial are not trees of the "
                        "same adapters (pass the trainable tree lora_transform returned)")
  out = []
  for (path, t), (_, t0) in zip(t_pairs, i_pairs):
    if not is_adapter(t) or getattr(t, "residual", None) is None:
      out.append(t)
      continue
    if is_loftq(t.residual):
      raise LoraTreeError(
          f"'{path}' was made with init={t.residual!r}: its base is the NF4 quantization of a "
          f"residual, so the original weights are only approximately that base plus the "
          f"initial factors, and no exact adapter of them exists; keep the quantized base "
          f"with the adapter")
    if not isinstance(t, LoraParam):
      raise LoraTreeError(
          f"'{path}' is a {type(t).__name__} made with init={t.residual!r}; its magnitude "
          f"is relative to the residual's column norms, so it has no exact form as a plain "
          f"adapter of the original weights")
    if (not isinstance(t0, LoraParam) or t0.residual != t.residual or t0.layout != t.layout
        or t0.scale != t.scale or t0.a.shape != t.a.shape or t0.b.shape != t.b.shape):
      raise LoraTreeError(
          f"'{path}': initial does not hold this adapter's initial factors (another init, "
          f"rank, scale or layout); pass the trainable tree lora_transform returned")
    ns = len(t.layout.stack_axes)
    out.append(LoraParam(a=jnp.concatenate([t.a, t0.a.astype(t.a.dtype)], axis=-1),
                         b=jnp.concatenate([t.b, -t0.b.astype(t.b.dtype)], axis=ns),
                         scale=t.scale, layout=t.layout, dropout=t.dropout))
  return t_def.unflatten(out)
