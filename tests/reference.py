"""The reference every transform test is held to: the merged model.

``check_against_merged`` compares ``jlora.lora(fn)(frozen, trainable, ...)``
with the same function applied to ``jlora.merge(frozen, trainable)``, and the
gradients of a loss of the former w.r.t. ``trainable`` with ``jax.grad`` of
the merged form ``loss(fn(jlora.merge(frozen, t), x))``. ``perturb`` moves B
away from its zero initialisation first, so a wrong low-rank path cannot pass.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
# Tests of one lazy rule run its code the same way eager and under jit; they
# run under jit alone to keep the file fast (eager dispatch compiles each op).
JIT_ONLY = pytest.mark.parametrize("jit", [True], ids=["jit"])

F32_FWD_ATOL = 1e-5
F32_GRAD_RTOL = 1e-4



def is_lora_param(x):
  return isinstance(x, jlora.LoraParam)


def normal(shape, scale=1.0, seed=0):
  """Test data from NumPy (eager jax.random compiles for every new shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def perturb(trainable, seed, scale=0.3):
  """A copy of ``trainable`` with every B (and every extra leaf) made non-zero."""
  leaves, treedef = jax.tree_util.tree_flatten(trainable, is_leaf=is_lora_param)
  out = []
  # In NumPy: an eager jnp add or cast would compile once per leaf shape.
  noise = lambda shape, scale, i: (  # noqa: E731
      scale * np.random.default_rng(seed * 1000 + i).standard_normal(shape)).astype(np.float32)
  for i, leaf in enumerate(leaves):
    if is_lora_param(leaf):
      b = noise(leaf.b.shape, scale, i).astype(leaf.b.dtype)
      out.append(dataclasses.replace(leaf, b=jnp.asarray(b)))
    else:
      moved = (np.asarray(leaf) + noise(leaf.shape, 0.1, i)).astype(leaf.dtype)
      out.append(jnp.asarray(moved))
  return jax.tree_util.tree_unflatten(treedef, out)


def maybe_jit(f, jit):
  return jax.jit(f) if jit else f


def loss_of(y):
  """A non-linear scalar loss of any output pytree."""
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(y):
    leaf = jnp.asarray(leaf, jnp.float32)
    total = total + jnp.mean(jnp.square(leaf - 0.1)) + jnp.mean(jnp.sin(3.0 * leaf))
  return total


def _f32(x):
  """``x`` as a float32 NumPy array (bf16 converts exactly)."""
  return np.asarray(x).astype(np.float32)


# The comparisons below run in NumPy: each eager jnp op would compile once
# per new shape, for every output and gradient leaf a test compares.
def max_abs_diff(x, y):
  return float(np.max(np.abs(_f32(x) - _f32(y))))


def assert_close_forward(got, want, atol=F32_FWD_ATOL):
  got_l, want_l = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(got_l) == len(want_l)
  for g, w in zip(got_l, want_l):
    assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
    err = max_abs_diff(g, w)
    assert err <= atol, f"max abs diff {err:.3g} > {atol:.3g}"


def assert_close_grads(got, want, rtol=F32_GRAD_RTOL):
  """Leafwise: max |got - want| <= rtol * max |want| (plus a tiny floor)."""
  got_p, got_def = jax.tree_util.tree_flatten_with_path(got)
  want_p, want_def = jax.tree_util.tree_flatten_with_path(want)
  assert got_def == want_def, (got_def, want_def)
  assert got_p, "no gradient leaves to compare"
  for (path, g), (_, w) in zip(got_p, want_p):
    scale = float(np.max(np.abs(_f32(w))))
    err = max_abs_diff(g, w)
    assert err <= rtol * scale + 1e-7, (
        f"{jax.tree_util.keystr(path)}: max abs diff {err:.3g}, max |grad| {scale:.3g}")


def assert_grads_nonzero(grads):
  for leaf in jax.tree_util.tree_leaves(grads):
    assert float(np.max(np.abs(_f32(leaf)))) > 0.0


# loss_of as one program per output shape: run eagerly (the reference's loss,
# and the loss of an eagerly run transform), its ops would compile one by one
# for every new shape. Under an outer jit it is inlined.
_loss_of_jit = jax.jit(loss_of)


def value_and_grad_of(f):
  """(loss, output), d loss / d t of ``loss_of(f(t, *args))``: one trace for both."""
  def loss_and_out(t, *args):
    y = f(t, *args)
    return _loss_of_jit(y), y
  return jax.value_and_grad(loss_and_out, has_aux=True)


def _merged_fn(fn, frozen):
  return lambda t, *a: fn(jlora.merge(frozen, t), *a)


def merged_reference(fn, frozen, trainable, args, grads=True):
  """(output, d loss / d trainable) of ``fn(jlora.merge(frozen, t), *args)``, under jit."""
  merged_fn = _merged_fn(fn, frozen)
  if not grads:
    return jax.jit(merged_fn)(trainable, *args), None
  (_, want), g = jax.jit(value_and_grad_of(merged_fn))(trainable, *args)
  return want, g


def check_against_merged(fn, frozen, trainable, args, *, jit, want=None,
                         fwd_atol=F32_FWD_ATOL, grad_rtol=F32_GRAD_RTOL, grads=True):
  """Forward and d loss / d trainable of lora(fn) equal those of the merged form.

  Args:
    want: the merged reference if already computed (it does not depend on
      ``jit``, so model tests compute it once).
  """
  apply = jlora.lora(fn)
  lora_fn = lambda t, *a: apply(frozen, t, *a)
  if want is None:
    if jit:
      # The reference and the checked functions in one compiled program.
      return _check(lora_fn, trainable, args, _merged_fn(fn, frozen), jit=jit,
                    fwd_atol=fwd_atol, grad_rtol=grad_rtol, grads=grads)
    want = merged_reference(fn, frozen, trainable, args, grads)
  return check_lora_fn(lora_fn, trainable, args, want, jit=jit,
                       fwd_atol=fwd_atol, grad_rtol=grad_rtol, grads=grads)


def check_lora_fn(lora_fn, trainable, args, want, *, jit, fwd_atol=F32_FWD_ATOL,
                  grad_rtol=F32_GRAD_RTOL, grads=True):
  """``lora_fn(t, *args)`` against ``want = (output, grads)`` of the merged form.

  The forward is checked twice: alone, and as computed under
  ``jax.value_and_grad`` (whose loss value is checked too).
  """
  return _check(lora_fn, trainable, args, None, want=want, jit=jit, fwd_atol=fwd_atol,
                grad_rtol=grad_rtol, grads=grads)


def _check(lora_fn, trainable, args, merged_fn, *, jit, want=None, fwd_atol, grad_rtol, grads):
  """check_lora_fn against ``want``, or against ``merged_fn`` computed in the same jit.

  Under jit, the forward alone, its value_and_grad (and the merged reference
  when ``merged_fn`` is given) are one program: one compilation, not three.
  Eagerly, ``lora_fn`` runs op by op, alone and under value_and_grad.
  """
  def lora_parts(t, *a):
    fwd = lora_fn(t, *a)
    return fwd, (value_and_grad_of(lora_fn)(t, *a) if grads else None)

  if jit:
    def program(t, *a):
      ref = None
      if merged_fn is not None:
        if grads:
          (_, ref_y), ref_g = value_and_grad_of(merged_fn)(t, *a)
          ref = (ref_y, ref_g)
        else:
          ref = (merged_fn(t, *a), None)
      return lora_parts(t, *a), ref
    (got, ad), ref = jax.jit(program)(trainable, *args)
    if ref is not None:
      want = ref
  else:
    got = lora_fn(trainable, *args)
  want_y, want_g = want
  assert_close_forward(got, want_y, fwd_atol)
  if not grads:
    return got
  if not jit:
    ad = value_and_grad_of(lora_fn)(trainable, *args)
  (loss, got_ad), got_g = ad
  assert_close_forward(got_ad, want_y, fwd_atol)
  want_loss = float(_loss_of_jit(want_y))
  assert abs(float(loss) - want_loss) <= max(fwd_atol, 1e-5) * max(1.0, abs(want_loss))
  assert_grads_nonzero(want_g)
  assert_close_grads(got_g, want_g, grad_rtol)
  return got


def assert_merge_matters(fn, frozen, trainable, args, params):
  """The perturbed adapters change the output, so a test against merge can fail."""
  base = jax.jit(fn)(params, *args)
  merged = jax.jit(fn)(jlora.merge(frozen, trainable), *args)
  assert max_abs_diff(base, merged) > 1e-2


class NoMaterialize:
  """Turns every LoraMaterializeWarning into an error inside the block."""

  def __enter__(self):
    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error", jlora.LoraMaterializeWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def adapt(params, spec, *, layouts=None, key=0):
  """lora_transform, then a non-zero B."""
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(key), layouts=layouts)
  return frozen, perturb(trainable, key + 100)




def weights(*shapes, key=0):
  """Test weights of the given shapes, scale 0.3."""
  return [normal(s, 0.3, seed=key * 100 + i) for i, s in enumerate(shapes)]


def square_problem(d=8, n=4, rank=2):
  """An adapted (d, d) weight ``w`` with perturbed factors, and an input."""
  (w,) = weights((d, d))
  x = normal((n, d), seed=1)
  frozen, trainable = adapt({"w": w}, jlora.LoraSpec(rank=rank, alpha=4, targets=["w"]))
  return frozen, trainable, x


# -- bitsandbytes (QLoRA) references ------------------------------------------------------


def bnb_quantize(w_out_in, *, block_size=64, double_quant=True):
  """bitsandbytes 0.50's NF4 quantization of a PyTorch-layout (out, in) weight
  (a NumPy array; bf16 given as ml_dtypes.bfloat16), as NumPy arrays:
  ``codes`` (packed bytes), ``absmax``, and with double quantization
  ``nested_absmax`` and ``offset``."""
  bnb_f = pytest.importorskip("bitsandbytes.functional")
  torch = pytest.importorskip("torch")
  w = np.asarray(w_out_in)
  t = (torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16) if w.dtype.name == "bfloat16"
       else torch.from_numpy(np.ascontiguousarray(w)))
  packed, state = bnb_f.quantize_4bit(t, blocksize=block_size, quant_type="nf4",
                                      compress_statistics=double_quant)
  out = {"codes": packed.numpy().reshape(-1), "absmax": state.absmax.numpy()}
  if double_quant:
    out["nested_absmax"] = state.state2.absmax.numpy()
    out["offset"] = np.float32(state.offset.item())
  return out


def bnb_dequantize(codes, absmax, nested_absmax, offset, shape, dtype, block_size=64):
  """bitsandbytes 0.50's ``dequantize_4bit`` of NF4 arrays laid out as it
  stores them, for a weight of PyTorch ``shape`` and ``dtype`` (a NumPy
  dtype name); returns float32 NumPy values."""
  bnb_f = pytest.importorskip("bitsandbytes.functional")
  torch = pytest.importorskip("torch")
  tdtype = getattr(torch, np.dtype(dtype).name)
  state2 = None
  if nested_absmax is not None:
    state2 = bnb_f.QuantState(absmax=torch.from_numpy(np.array(nested_absmax)),
                              code=bnb_f.create_dynamic_map(), blocksize=256,
                              dtype=torch.float32)
  state = bnb_f.QuantState(
      absmax=torch.from_numpy(np.array(absmax)), shape=torch.Size(shape),
      code=bnb_f.get_4bit_type("nf4", device="cpu"), blocksize=block_size, quant_type="nf4",
      dtype=tdtype, offset=None if offset is None else torch.tensor(float(offset)),
      state2=state2)
  packed = torch.from_numpy(np.array(codes).reshape(-1, 1))
  return bnb_f.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
