"""PiSSA and OLoRA: the factors and the residual base equal PEFT's on the same
weights, and the adapted model starts equal to the original."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from lazy import lazy
from reference import max_abs_diff, normal

torch = lazy("torch")
peft = lazy("peft")


@pytest.fixture(autouse=True, scope="module")
def _needs_torch_and_peft():
  pytest.importorskip("torch")
  pytest.importorskip("peft")


def _peft_init(weight_out_in: np.ndarray, init: str, r=3, alpha=6):
  """PEFT's lora_A (r, in), lora_B (out, r) and residual weight (out, in)."""
  torch.manual_seed(0)
  base = torch.nn.Sequential(torch.nn.Linear(weight_out_in.shape[1], weight_out_in.shape[0],
                                             bias=False))
  with torch.no_grad():
    base[0].weight.copy_(torch.from_numpy(weight_out_in))
  model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"],
                                                     init_lora_weights=init))
  layer = model.base_model.model[0]
  return (layer.lora_A["default"].weight.detach().numpy(),
          layer.lora_B["default"].weight.detach().numpy(),
          layer.base_layer.weight.detach().numpy())


def _ours(w_in_out, init, r=3, alpha=6, layouts=None):
  spec = jlora.LoraSpec(rank=r, alpha=alpha, targets=["w"], init=init, layouts=layouts or {})
  return jlora.lora_transform({"w": w_in_out}, spec, key=jax.random.key(0))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_peft(init):
  w_pt = np.array(normal((6, 10), 0.5, seed=1))             # PyTorch (out, in)
  lora_a, lora_b, residual = _peft_init(w_pt, init)
  frozen, t = _ours(jnp.asarray(w_pt.T), init)
  lp = t["w"]
  np.testing.assert_allclose(frozen["w"], residual.T, atol=1e-5)
  if init == "olora":       # QR is unique up to the same sign convention on both sides
    np.testing.assert_allclose(lp.a, lora_a.T, atol=1e-5)
    np.testing.assert_allclose(lp.b, lora_b.T, atol=1e-5)
  for k in range(3):        # each singular direction, whatever its sign
    ours = np.outer(lp.a[:, k], lp.b[k])
    theirs = np.outer(lora_a[k], lora_b[:, k])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert max_abs_diff(frozen["w"], w_pt.T) > 0.1              # the base did change


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_the_adapted_model_starts_equal_to_the_original(init):
  layouts = {"w": jlora.Layout((1, 2), (3,), (0,))}          # a stacked multi-axis kernel
  w = normal((2, 4, 3, 5), 0.5, seed=2)
  frozen, t = _ours(w, init, layouts=layouts)
  assert t["w"].a.shape == (2, 4, 3, 3) and t["w"].b.shape == (2, 3, 5)
  fn = lambda p, x: jnp.einsum("lbij,lijo->lbo", x, p["w"])  # noqa: E731
  x = normal((2, 7, 4, 3), seed=3)
  np.testing.assert_allclose(jlora.merge(frozen, t)["w"], w, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(frozen, t, x), fn({"w": w}, x), atol=1e-4)


def test_randomized_pissa_finds_the_top_singular_directions():
  """pissa_niter_4 on a matrix with a spectral gap takes what the exact SVD takes."""
  rng = np.random.default_rng(4)
  u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
  v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
  s = np.array([9.0, 7.0, 5.0] + [0.1 * 0.9 ** k for k in range(27)])
  w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
  exact, _ = _ours(w, "pissa")
  fast, _ = _ours(w, "pissa_niter_4")
  assert max_abs_diff(fast["w"], exact["w"]) < 1e-3 * float(jnp.abs(w).max())


def test_an_abstract_base_gives_abstract_factors_and_no_residual():
  w = jax.ShapeDtypeStruct((10, 6), jnp.float32)
  frozen, t = _ours(w, "pissa")
  assert frozen["w"] is w and isinstance(t["w"].a, jax.ShapeDtypeStruct)


def test_bad_init_names_the_choices():
  with pytest.raises(jlora.LoraSpecError, match="init must be one of.*pissa_niter_<N>"):
    jlora.LoraSpec(init="pissa_niter_x")


def _bnb_loftq(w_in_out: np.ndarray, rank: int, scale: float, rounds: int):
  """LoftQ with bitsandbytes' own NF4 and NumPy's SVD: the dequantized base
  and s B A, in (in, out) terms."""
  bnb = pytest.importorskip("bitsandbytes.functional")
  w = w_in_out.astype(np.float64)
  res = w.copy()
  for _ in range(rounds):
    t = torch.from_numpy(np.ascontiguousarray(res.T.astype(np.float32)))   # (out, in)
    packed, state = bnb.quantize_4bit(t, blocksize=64, compress_statistics=True,
                                      quant_type="nf4")
    deq = bnb.dequantize_4bit(packed, state).numpy().T.astype(np.float64)
    u, s, vt = np.linalg.svd(w - deq, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vt[:rank]
    res = w - low
  return deq, low


@pytest.mark.parametrize("init,rounds", [("loftq", 1), ("loftq_iter_3", 3)])
def test_loftq_equals_the_algorithm_on_bitsandbytes_nf4(init, rounds):
  w = np.array(normal((128, 48), 0.5, seed=5))
  frozen, t = _ours(jnp.asarray(w), init, r=4, alpha=8)
  q = frozen["w"]
  assert isinstance(q, jlora.NF4Array)
  deq, low = _bnb_loftq(w, 4, 2.0, rounds)
  np.testing.assert_allclose(q.dequantize(jnp.float32), deq, atol=1e-6)
  np.testing.assert_allclose(t["w"].delta(), low, atol=1e-4)
  # The adapter recovers part of what quantization lost.
  lost = np.abs(deq - w).mean()
  assert np.abs(deq + low - w).mean() < 0.95 * lost
  x = normal((3, 128), seed=6)
  y = jlora.lora(lambda p, x: x @ p["w"])(frozen, t, x)
  np.testing.assert_allclose(y, x @ (deq + low), atol=1e-3)
