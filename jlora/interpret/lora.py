"""``jlora.lora``: the LoRA transformation of any JAX function."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora import transform
from jlora._paths import is_weight_node
from jlora.adapters import bank as bank_lib
from jlora.adapters.bank import LoraBank
from jlora.errors import LoraSpecError, LoraTreeError
from jlora.interpret.bank_term import STRATEGIES
from jlora.interpret import examples as examples_lib
from jlora.interpret import interpreter, tracing
from jlora.interpret.values import AdaptedValue, as_base


def lora(fn: Callable[..., Any], *, bank_dot: str = "auto", check_ids: bool = False
         ) -> Callable[..., Any]:
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
    bank_dot: how a bank of adapters computes a batch that mixes adapters:
      ``"auto"``, ``"gather"``, ``"segment"`` or ``"masked"`` (see
      ``jlora.stack_adapters``). Every way keeps adapters isolated: a NaN or
      Inf in one adapter reaches only the rows that use it.
    check_ids: also check traced ``lora_adapter_ids`` (under ``jax.jit``)
      with ``jax.experimental.checkify``: wrap the step in
      ``checkify.checkify`` and an id out of range raises from
      ``err.throw()``. Without it, concrete ids are checked (``LoraTreeError``)
      but traced ones cannot be: an id out of range under ``jit`` gives NaN
      rows (a scalar id: the whole batch), never another adapter's output.

  Returns:
    ``apply(frozen, trainable, *args, lora_dropout_key=None,
    lora_adapter_ids=None, **kwargs)``. Passing ``lora_dropout_key`` (a PRNG
    key) turns on the spec's LoRA dropout. ``lora_adapter_ids`` goes with a
    bank (``jlora.stack_adapters``): an int array with each example's
    adapter (-1: the base model alone), or a scalar for the whole batch;
    the examples are the leading axis of the function's array arguments.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((4, 3))}
    >>> spec = jlora.LoraSpec(rank=2, alpha=2, targets=["w"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> apply = jlora.lora(lambda p, x: x @ p["w"])
    >>> apply(frozen, trainable, jnp.ones((1, 4))).shape
    (1, 3)
  """
  if bank_dot not in STRATEGIES:
    raise LoraSpecError(f"bank_dot must be one of {STRATEGIES}, got {bank_dot!r}")
  traces = tracing.TraceCache(fn)

  @functools.wraps(fn)
  def apply(frozen, trainable, *args, lora_dropout_key=None, lora_adapter_ids=None, **kwargs):
    leaves, treedef, adapters, paths = transform.assemble_with_paths(frozen, trainable)
    tracing.check_param_leaves(zip(paths, leaves))
    ids = _adapter_ids(lora_adapter_ids, [a for _, a in adapters.values()], check_ids)
    # A weight stored another way (an NF4Array) is traced as the dense weight
    # it stands for, and enters the interpreter as a value with no adapter.
    stand_ins = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_weight_node(leaf) else leaf
                 for leaf in leaves]
    traced = traces(stand_ins, treedef, args, kwargs)
    invals = _invals(traced, leaves, adapters, paths)
    examples = None
    if ids is not None and ids.ndim == 1:
      examples = _example_axes(traced, leaves, adapters, paths, stand_ins, treedef, args,
                               kwargs, ids)
    ctx = interpreter.Context(dropout_key=lora_dropout_key, adapter_ids=ids, bank_dot=bank_dot,
                              examples=examples)
    outs = interpreter.eval_jaxpr(traced.jaxpr, invals + tracing.dynamic_args(args, kwargs),
                                  ctx)
    outs = interpreter.dense_all(outs, "is returned by the transformed function")
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)

  probe_traces = tracing.TraceCache(fn)
  probes: dict = {}

  def _example_axes(traced, leaves, adapters, paths, stand_ins, treedef, args, kwargs, ids):
    """Which bank dots' inputs lead with the examples (``examples.py``), once
    per trace of ``fn`` and set of banks."""
    banks = tuple(sorted(path for path, a in adapters.values() if isinstance(a, LoraBank)))
    n = ids.shape[0]
    key = (id(traced), banks, n)
    hit = probes.get(key)
    if hit is not None and hit[0] is traced:
      return hit[1]
    shapes = [tuple(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(
        (stand_ins, args, kwargs))]
    size = examples_lib.probe_size(n, shapes)
    p_args, p_kwargs = examples_lib.resize_examples((args, kwargs), n, size)

    def run(found, leaves, arrays, dyn, ids):
      p_traced = probe_traces(stand_ins, treedef, p_args, p_kwargs)
      ctx = interpreter.Context(adapter_ids=ids, bank_dot=bank_dot, examples=found)
      both = {i: (adapters[i][0], a) for i, a in arrays.items()}
      interpreter.eval_jaxpr(p_traced.jaxpr, _invals(p_traced, leaves, both, paths) + dyn, ctx)

    found = examples_lib.probe(run, size, leaves, {i: a for i, (_, a) in adapters.items()},
                               tracing.dynamic_args(p_args, p_kwargs),
                               jax.ShapeDtypeStruct((size,), ids.dtype))
    if len(probes) >= 64:
      probes.clear()
    probes[key] = (traced, found)
    return found

  apply.trace_cache = traces   # for tests and debugging: len(apply.trace_cache)
  return apply


def _invals(traced: Any, leaves: list[Any], adapters: dict[int, Any], paths: list[str]
            ) -> list[Any]:
  """The jaxpr's parameter inputs: an adapted value at each adapted weight."""
  invals = []
  for i in traced.present:
    if i in adapters:
      path, adapter = adapters[i]
      invals.append(AdaptedValue.of(path, leaves[i], [adapter]))
    elif is_weight_node(leaves[i]):
      # A weight stored another way (an NF4Array) enters as a value with no adapter.
      invals.append(AdaptedValue(as_base(leaves[i]), (), paths[i]))
    else:
      invals.append(leaves[i])
  return invals


def _adapter_ids(ids: Any, adapters: list[Any], checked: bool) -> jax.Array | None:
  """Checks ``lora_adapter_ids`` against the banks in ``trainable``."""
  banks = [a for a in adapters if isinstance(a, LoraBank)]
  if ids is None:
    return None   # a bank without ids is reported at its first use, with its path
  if not banks:
    raise LoraTreeError("lora_adapter_ids is given, but trainable holds no bank of adapters "
                        "(jlora.stack_adapters)")
  return bank_lib.adapter_ids(ids, banks[0].names, checked=checked)
