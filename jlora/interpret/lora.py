"""``jlora.lora``: the LoRA transformation of any JAX function."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from jlora import transform
from jlora._paths import is_weight_node
from jlora.interpret import interpreter, tracing
from jlora.interpret.values import AdaptedValue, as_base


def lora(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Transforms ``fn(params, *args, **kwargs)`` into ``fn(frozen, trainable, ...)``.

  The returned function computes what ``fn`` computes with every adapted
  weight replaced by ``W0 + s B A``, but without forming that sum: each
  matmul against an adapted weight becomes ``x W0 + s (x A) B``. It composes
  with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.value_and_grad``,
  and gradients never flow to W0.

  Frozen weights may be stored quantized (``jlora.NF4Array`` leaves from
  ``jlora.quantize``, adapted or not): each is dequantized to the dtype the
  model uses it in, where it is used, inside the traced step, and recomputed
  from the packed arrays in the backward pass, so no dequantized copy of the
  model is ever held.

  ``fn`` is traced once per combination of parameter structure, argument
  shapes and static arguments, and the trace is reused, so an eager loop
  traces the model once. Array arguments (``jax.Array``, NumPy arrays and
  NumPy numbers) are traced; every other argument (Python numbers, strings,
  ``train=True``, a NumPy bool) is static.

  Args:
    fn: a function whose first argument is the parameter pytree, such as a
      Flax Linen ``model.apply``.

  Returns:
    ``apply(frozen, trainable, *args, lora_dropout_key=None, **kwargs)``.
    Passing ``lora_dropout_key`` (a PRNG key) turns on the spec's LoRA
    dropout.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((4, 3))}
    >>> spec = jlora.LoraSpec(rank=2, alpha=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> apply = jlora.lora(lambda p, x: x @ p["w"])
    >>> apply(frozen, trainable, jnp.ones((1, 4))).shape
    (1, 3)
  """
  traces = tracing.TraceCache(fn)

  @functools.wraps(fn)
  def apply(frozen, trainable, *args, lora_dropout_key=None, **kwargs):
    leaves, treedef, adapters, paths = transform.assemble_with_paths(frozen, trainable)
    # A weight stored another way (an NF4Array) is traced as the dense weight
    # it stands for, and enters the interpreter as a value with no adapter.
    stand_ins = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_weight_node(leaf) else leaf
                 for leaf in leaves]
    traced = traces(stand_ins, treedef, args, kwargs)
    invals = []
    for i in traced.present:
      if i in adapters:
        path, adapter = adapters[i]
        invals.append(AdaptedValue.of(path, leaves[i], [adapter]))
      elif is_weight_node(leaves[i]):
        invals.append(AdaptedValue(as_base(leaves[i]), (), paths[i]))
      else:
        invals.append(leaves[i])
    ctx = interpreter.Context(dropout_key=lora_dropout_key)
    outs = interpreter.eval_jaxpr(traced.jaxpr, invals + tracing.dynamic_args(args, kwargs),
                                  ctx)
    outs = interpreter.dense_all(outs, "is returned by the transformed function")
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)

  apply.trace_cache = traces   # for tests and debugging: len(apply.trace_cache)
  return apply
