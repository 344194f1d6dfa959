"""Reading compiled HLO: the dots a program computes, and which of them are
shaped like a frozen weight (a dW0 or a merged W0 + s B A)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

import jlora

# `%name = f32[3,5]{1,0} dot(...)`; fused computations are printed too, so a
# dot that XLA fused into a kernel is seen as well.
_DOT = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\w+\[([\d,]*)\](?:\{[^}]*\})?\s+(?:dot|convolution)\(",
    re.MULTILINE)
# A matmul library call (cuBLAS on GPU, oneDNN on some CPUs) replaces the dot:
# `%c = (f32[3,5]{1,0}, s8[...]{0}) custom-call(...), custom_call_target="__cublas$gemm"`.
_GEMM_CALL = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\(?\w+\[([\d,]*)\][^\n]*?custom-call\("
    r"[^\n]*custom_call_target=\"[^\"]*(?:gemm|matmul)[^\"]*\"",
    re.MULTILINE)


def dot_result_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """Result shapes of every dot / convolution (or matmul library call) in HLO text."""
  found = _DOT.findall(hlo_text) + _GEMM_CALL.findall(hlo_text)
  return [tuple(int(d) for d in dims.split(",") if d) for dims in found]


def shape_key(shape) -> tuple[int, ...]:
  """Shapes equal up to axis order and unit axes (a dot may emit either order)."""
  return tuple(sorted(d for d in shape if d != 1))


def frozen_weight_shapes(frozen, trainable) -> dict[str, set[tuple[int, ...]]]:
  """For each frozen weight (by path), every shape its gradient or a merged
  copy could take, up to axis order: as stored, and for an adapted weight
  also per slice of its stack axes and flattened to (fan_in, fan_out)."""
  is_leaf = lambda x: x is None or isinstance(x, (jlora.LoraParam, jlora.NF4Array))
  f_leaves = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_leaf)[0]
  t_leaves = jax.tree_util.tree_leaves(trainable, is_leaf=is_leaf)
  shapes = {}
  for (path, w0), lp in zip(f_leaves, t_leaves, strict=True):
    if w0 is None or w0.ndim < 2:
      continue
    keys = {shape_key(w0.shape)}
    if isinstance(lp, jlora.LoraParam):
      lay = lp.layout
      fan_in, fan_out = lay.fan_in(w0.shape), lay.fan_out(w0.shape)
      stack = [w0.shape[i] for i in lay.stack_axes]
      keys |= {shape_key([w0.shape[i] for i in lay.in_axes + lay.out_axes]),
               shape_key([fan_in, fan_out]), shape_key(stack + [fan_in, fan_out])}
    shapes[jax.tree_util.keystr(path)] = keys
  return shapes


def weight_shaped_dots(hlo_text: str, frozen, trainable) -> list[tuple[tuple[int, ...], list[str]]]:
  """The dots whose result is shaped like a frozen weight, with the weights' paths."""
  weights = frozen_weight_shapes(frozen, trainable)
  found = []
  for shape in dot_result_shapes(hlo_text):
    names = [name for name, keys in weights.items() if shape_key(shape) in keys]
    if names:
      found.append((shape, names))
  return found


def loss_of(y):
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


def lora_step_hlo(fn, frozen, trainable, args, *, also_frozen_grad=False) -> str:
  """The optimised HLO of one LoRA training step.

  ``also_frozen_grad``: also return d loss / d frozen from the step (a
  control: then the W0-shaped dots must be there).
  """
  apply = jlora.lora(fn)
  tx = jlora.optimizer(optax.adam(1e-3), trainable)

  def step(trainable, opt_state, frozen, *args):
    loss_fn = lambda t, f: loss_of(apply(f, t, *args))
    argnums = (0, 1) if also_frozen_grad else 0
    loss, grads = jax.value_and_grad(loss_fn, argnums=argnums)(trainable, frozen)
    grads, frozen_grads = grads if also_frozen_grad else (grads, None)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, frozen_grads

  opt_state = tx.init(trainable)
  return jax.jit(step).lower(trainable, opt_state, frozen, *args).compile().as_text()


def full_step_hlo(fn, params, args) -> str:
  tx = optax.adam(1e-3)

  def step(params, opt_state, *args):
    loss, grads = jax.value_and_grad(lambda p: loss_of(fn(p, *args)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step).lower(params, tx.init(params), *args).compile().as_text()


# `%all-gather.3 = f32[64,160]{1,0} all-gather(...)`, also the async
# `all-gather-start` (whose result is a tuple: the gathered shape is the last).
_ALL_GATHER = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(?[^=\n]*?)\s+all-gather(?:-start)?\(", re.MULTILINE)
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in HLO text (the gathered operand's)."""
  out = []
  for m in _ALL_GATHER.finditer(hlo_text):
    shapes = _SHAPE.findall(m.group(1))
    if shapes:
      out.append(tuple(int(d) for d in shapes[-1].split(",") if d))
  return out


def weight_gathers(hlo_text: str, frozen) -> dict[str, int]:
  """How many all-gathers produce a tensor shaped like each frozen weight, as
  stored or as one layer of a stack (its leading axis dropped): the gathers
  of W0 itself. Shapes are compared in order, so (d, f) and (f, d) differ."""
  weights = {}
  for path, w0 in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    if w0 is not None and len(w0.shape) >= 2:
      shape = tuple(w0.shape)
      weights[jax.tree_util.keystr(path)] = {shape} | ({shape[1:]} if len(shape) > 2 else set())
  counts = {name: 0 for name in weights}
  for shape in all_gather_shapes(hlo_text):
    for name, keys in weights.items():
      if shape in keys:
        counts[name] += 1
  return counts
