"""infer_layouts: how a model contracts each weight, from an abstract trace; and
the inferred layouts give a LoRA forward equal to the merged model's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from models import LinenLM, LMConfig, NNXLM, batched_einsum

L = jlora.Layout
KEY = jax.random.key(0)


def _fill(tree, seed, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype)), tree)


def _check_forward(fn, params, *args, rank=2, atol=1e-4):
  """LoRA forward with the inferred layouts == fn on the merged params (B != 0)."""
  layouts = jlora.infer_layouts(fn, params, *args)
  spec = jlora.LoraSpec(rank=rank, alpha=2 * rank, targets=lambda p, leaf: p in layouts)
  _, t_abstract = jlora.lora_transform(jax.eval_shape(lambda: params), spec, layouts=layouts)
  trainable = _fill(t_abstract, 1)
  frozen = jlora.frozen_like(params, trainable)
  merged = jlora.merge(frozen, trainable)
  want = fn(merged, *args)
  got = jax.jit(jlora.lora(fn))(frozen, trainable, *args)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
  assert float(jnp.abs(want - fn(params, *args)).max()) > 1e-3     # the adapters matter
  return layouts


class DenseGeneralAttn(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 4), name="query")(x)                         # (d, h, k)
    return nn.DenseGeneral(8, axis=(-2, -1), name="out")(jnp.tanh(q))   # (h, k, d)


def test_dense_general_in_and_out_projections():
  model = DenseGeneralAttn()
  x = jnp.ones((3, 5, 8))
  params = _fill(jax.eval_shape(model.init, KEY, x), 0)
  layouts = _check_forward(model.apply, params, x)
  assert layouts == {"params/query/kernel": L((0,), (1, 2)),
                     "params/out/kernel": L((0, 1), (2,))}


def test_nn_scan_stacks_on_axis_0():
  cfg = LMConfig()
  model = LinenLM(cfg)
  toks = (jnp.arange(2 * cfg.seq).reshape(2, cfg.seq) * 5) % cfg.vocab
  params = _fill(jax.eval_shape(model.init, KEY, toks), 0, scale=0.2)
  layouts = jlora.infer_layouts(model.apply, params, toks)
  assert layouts == {
      "params/layers/query/kernel": L((1,), (2, 3), (0,)),
      "params/layers/key/kernel": L((1,), (2, 3), (0,)),
      "params/layers/value/kernel": L((1,), (2, 3), (0,)),
      "params/layers/out/kernel": L((1, 2), (3,), (0,)),
      "params/layers/up/kernel": L((1,), (2,), (0,)),
      "params/layers/down/kernel": L((1,), (2,), (0,)),
      "params/lm_head/kernel": L((0,), (1,)),
  }
  # The embedding (a gather), biases and norms reach no dot_general: no layout.
  assert "params/embed/embedding" not in layouts and "params/pos" not in layouts


def test_batched_einsum_gives_a_stack_axis():
  params = {"experts": jnp.ones((3, 8, 6)), "proj": jnp.ones((6, 5))}
  x = jnp.ones((3, 2, 8))
  params = _fill(params, 0)
  layouts = _check_forward(batched_einsum, params, x)
  assert layouts == {"experts": L((1,), (2,), (0,)), "proj": L((0,), (1,))}


def test_vmap_over_stacked_weights_and_lax_scan():
  params = _fill({"w": jnp.ones((4, 8, 6)), "v": jnp.ones((3, 6, 6))}, 0)
  x = jnp.ones((4, 2, 8))

  def fn(p, x):
    h = jax.vmap(lambda w, xi: xi @ w)(p["w"], x)             # (4, 2, 6)
    h, _ = jax.lax.scan(lambda c, v: (jnp.tanh(c @ v), None), h, p["v"])
    return h

  layouts = _check_forward(fn, params, x)
  assert layouts == {"w": L((1,), (2,), (0,)), "v": L((1,), (2,), (0,))}


@pytest.mark.parametrize("form", ["transpose", "einsum", "dot_general"])
def test_out_in_kernel_contracted_over_axis_1(form):
  params = _fill({"weight": jnp.ones((6, 8))}, 0)       # PyTorch (out, in)
  x = jnp.ones((3, 8))
  fns = {
      "transpose": lambda p, x: x @ p["weight"].T,
      "einsum": lambda p, x: jnp.einsum("bi,oi->bo", x, p["weight"]),
      "dot_general": lambda p, x: jax.lax.dot_general(p["weight"], x, (((1,), (1,)), ((), ()))).T,
  }
  layouts = _check_forward(fns[form], params, x)
  assert layouts == {"weight": L((1,), (0,))}


def test_reshape_merges_axes_into_one_layout_group():
  params = _fill({"o": jnp.ones((2, 4, 8))}, 0)           # (h, k, d) used as (h*k, d)
  x = jnp.ones((3, 8))
  layouts = _check_forward(lambda p, x: x @ p["o"].reshape(8, 8), params, x)
  assert layouts == {"o": L((0, 1), (2,))}


def test_through_jit_remat_and_cond():
  params = _fill({"a": jnp.ones((8, 6)), "b": jnp.ones((6, 4))}, 0)
  x = jnp.ones((3, 8))

  @jax.jit
  def inner(p, x):
    return jax.checkpoint(lambda h: jnp.tanh(h @ p["a"]))(x)

  def fn(p, x):
    h = inner(p, x)
    return jax.lax.cond(True, lambda h: h @ p["b"], lambda h: 2.0 * (h @ p["b"]), h)

  layouts = _check_forward(fn, params, x)
  assert layouts == {"a": L((0,), (1,)), "b": L((0,), (1,))}


def test_tied_weight_used_consistently():
  params = _fill({"w": jnp.ones((8, 8))}, 0)
  x = jnp.ones((3, 8))
  layouts = _check_forward(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"], params, x)
  assert layouts == {"w": L((0,), (1,))}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_a_wrong_layout_of_a_transposed_weight_names_the_stored_shape_first(use_jit):
  # As Hugging Face's Flax GPT-2 Conv1D: a kernel stored (out, in), transposed before x @ w.
  params = _fill({"c_attn": {"kernel": jnp.ones((192, 64))}}, 0)
  fn = lambda p, x: x @ p["c_attn"]["kernel"].T  # noqa: E731
  x = jnp.ones((2, 64))
  wrong = L((0,), (1,))
  apply = jlora.lora(fn)
  apply = jax.jit(apply) if use_jit else apply
  for kind in ("lora", "dora", "bank"):
    spec = jlora.LoraSpec(rank=2, targets=["kernel"], layouts={"kernel": wrong},
                          use_dora=kind == "dora")
    frozen, trainable = jlora.lora_transform(params, spec, key=KEY)
    ids = None
    if kind == "bank":
      trainable, ids = jlora.stack_adapters({"a": trainable, "b": trainable}), jnp.array([0, 1])
    with pytest.raises(jlora.LoraLayoutError, match=(
        r"^'c_attn/kernel': its LoRA factors were laid out for the weight as stored \(shape "
        r"\(192, 64\)\) with input axes \(0,\), output axes \(1,\) and stack axes \(\), "
        r"but the model uses a view of it \(shape \(64, 192\), where those are axes \(1,\), "
        r"\(0,\) and \(\)\) and contracts the view over axes \(0,\) with batch axes \(\); "
        r"this use needs Layout\(in_axes=\(1,\), out_axes=\(0,\), stack_axes=\(\)\) for the "
        r"stored weight\. Build the adapter")):
      apply(frozen, trainable, x, lora_adapter_ids=ids)
  # The layout it names is the one that works (and the one inferred).
  assert jlora.infer_layouts(fn, params, x) == {"c_attn/kernel": L((1,), (0,))}
  _check_forward(fn, params, x)


def test_conflicting_uses_raise():
  params = {"emb": jnp.ones((8, 8)), "ok": jnp.ones((8, 8))}
  x = jnp.ones((3, 8))
  fn = lambda p, x: (x @ p["ok"]) @ p["emb"] + x @ p["emb"].T  # noqa: E731
  with pytest.raises(jlora.LoraLayoutError, match=r"'emb': axis \d is used as an (in|out) axis "
                     r"by a dot_general .* and as an (in|out) axis by .*LoraSpec\(layouts="):
    jlora.infer_layouts(fn, params, x)
  # An axis that is a stack axis in one use and contracted in another conflicts too.
  def fn2(p, x):
    per_slice = jax.vmap(lambda w, xi: xi @ w)(p["s"], x)          # axis 0: stack
    mixed = jnp.einsum("sio,s->io", p["s"], jnp.ones(2))            # axis 0: contracted
    return per_slice.sum(0) + x[0] @ mixed

  with pytest.raises(jlora.LoraLayoutError, match=r"'s': axis 0 is used as an? (stack|in) axis"):
    jlora.infer_layouts(fn2, {"s": jnp.ones((2, 8, 8))}, jnp.ones((2, 3, 8)))
  # Using one slice of a stacked weight is consistent with the stacked use.
  def fn3(p, x):
    return jax.vmap(lambda w, xi: xi @ w)(p["s"], x).sum(0) + x[0] @ p["s"][0]

  assert _check_forward(fn3, _fill({"s": jnp.ones((2, 8, 8))}, 0), jnp.ones((2, 3, 8))) == {
      "s": L((1,), (2,), (0,))}


def test_abstract_params_and_args():
  model = DenseGeneralAttn()
  x = jnp.ones((3, 5, 8))
  params = _fill(jax.eval_shape(model.init, KEY, x), 0)
  concrete = jlora.infer_layouts(model.apply, params, x)
  abstract = jlora.infer_layouts(model.apply, jax.eval_shape(lambda: params),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert abstract == concrete and len(concrete) == 2
  # Static non-array arguments pass through (a flag the model branches on).
  def fn(p, x, double):
    y = x @ p["w"]
    return 2 * y if double else y
  assert jlora.infer_layouts(fn, {"w": jax.ShapeDtypeStruct((8, 2), jnp.bfloat16)},
                             jax.ShapeDtypeStruct((3, 8), jnp.bfloat16), True) == {
                                 "w": L((0,), (1,))}


def test_nnx_linear_general_and_einsum():
  cfg = LMConfig(layers=1)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NNXLM(cfg, nnx.Rngs(0))))
  toks = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  layouts = jlora.infer_layouts(lambda s, t: nnx.merge(graphdef, s)(t), abstract, toks)
  assert layouts["blocks/0/query/kernel"] == L((0,), (1, 2))      # LinearGeneral
  assert layouts["blocks/0/value/kernel"] == L((0,), (1, 2))      # Einsum "bsd,dhk->bshk"
  assert layouts["blocks/0/out/kernel"] == L((0, 1), (2,))
  assert layouts["blocks/0/up/kernel"] == L((0,), (1,))
  assert layouts["head/kernel"] == L((0,), (1,))
  assert "embed/embedding" not in layouts
