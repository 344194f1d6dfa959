"""Fused kernels (``jlora.peft.fused``): one Flax kernel that is several
PyTorch modules, both ways against PyTorch PEFT.

The Flax side is Gemma's ``kv_einsum``: a kernel ``(2, K, D, H)`` contracted
over D, whose first output axis is "k or v"; the PyTorch side has two
``nn.Linear`` modules ``k_proj`` and ``v_proj`` ``(K*H, D)``. The rules name
the kernel ``k_proj+v_proj``. Outputs agree within 1e-4 with PEFT's; a
folder that adapts one of the two modules, and a kernel whose first output
axis does not hold one entry per module, are refused. (Tunix's Gemma 3 is
held to ``Gemma3ForCausalLM`` in ``tests/test_peft_tunix.py``.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.errors import LoraPeftError
from lazy import lazy

torch = lazy("torch")
peft = lazy("peft")

D, K, H, B = 12, 2, 4, 3
KV = jlora.Layout((2,), (0, 1, 3))
RULES = jlora.peft.Rules(patterns=[("attn/kv", "attn.k_proj+v_proj")], kernel_leaves=("w",),
                         layouts={r"attn/kv/w": KV})


@pytest.fixture(autouse=True, scope="module")
def _needs_torch_and_peft():
  pytest.importorskip("torch")
  pytest.importorskip("peft")


@functools.cache
def _net_class():
  """The PyTorch model: a ``torch.nn.Module``, so defined once torch is imported."""

  class Attn(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.k_proj = torch.nn.Linear(D, K * H, bias=False)
      self.v_proj = torch.nn.Linear(D, K * H, bias=False)

    def forward(self, x):
      return torch.cat([self.k_proj(x), self.v_proj(x)], -1)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.attn = Attn()

    def forward(self, x):
      return self.attn(x)

  return Net


def fn(params, x):
  # 'BSD,CKDH->CBSKH' as Gemma, here without the sequence axis: (2, B, K, H).
  out = jnp.einsum("bd,ckdh->cbkh", x, params["attn"]["kv"]["w"])
  return jnp.concatenate([out[0].reshape(B, -1), out[1].reshape(B, -1)], -1)


@pytest.fixture(scope="module")
def base():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((2, K, D, H)).astype(np.float32)
  params = {"attn": {"kv": {"w": jnp.asarray(w)}}}
  x = rng.standard_normal((B, D)).astype(np.float32)
  return params, x


def torch_net(params):
  net = _net_class()()
  w = np.asarray(params["attn"]["kv"]["w"])          # (2, K, D, H) -> (K*H, D) each
  with torch.no_grad():
    for i, m in enumerate([net.attn.k_proj, net.attn.v_proj]):
      m.weight.copy_(torch.tensor(np.transpose(w[i], (0, 2, 1)).reshape(K * H, D)))
  return net.eval()


def torch_out(net, x):
  with torch.no_grad():
    return net(torch.tensor(x)).numpy()


def close(got, want):
  err = float(np.max(np.abs(np.asarray(got) - want)))
  assert err <= 1e-4 * float(np.max(np.abs(want))), err


def test_the_torch_net_is_the_flax_function(base):
  params, x = base
  close(fn(params, x), torch_out(torch_net(params), x))


def adapted(params, **spec_kw):
  spec = jlora.LoraSpec(rank=3, alpha=6, targets=["attn/kv/w"], layouts={"attn/kv/w": KV},
                        **spec_kw)
  frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(1))
  rng = np.random.default_rng(2)
  trainable = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype),
                           trainable)
  return spec, frozen, trainable


def test_jlora_to_peft(base, tmp_path):
  params, x = base
  spec, frozen, trainable = adapted(params)
  config = jlora.peft.save(tmp_path, trainable, RULES, spec=spec)
  assert config["target_modules"] == ["k_proj", "v_proj"]
  want = np.asarray(jlora.lora(fn)(frozen, trainable, x))
  model = peft.PeftModel.from_pretrained(torch_net(params), tmp_path).eval()
  close(torch_out(model, x), want)
  assert np.max(np.abs(want - np.asarray(fn(params, x)))) > 0.1
  # jlora reads its own folder back as one pair of rank r (one lora_A for both).
  back = jlora.peft.load(tmp_path, params, RULES)
  got = back.trainable["attn"]["kv"]["w"]
  np.testing.assert_array_equal(got.a, trainable["attn"]["kv"]["w"].a)
  np.testing.assert_array_equal(got.b, trainable["attn"]["kv"]["w"].b)
  assert got.scale == 2.0 and got.layout == KV


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_to_jlora(base, tmp_path, use_rslora):
  params, x = base
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj"],
                        init_lora_weights=False, use_rslora=use_rslora,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5})
  model = peft.get_peft_model(torch_net(params), cfg).eval()
  want = torch_out(model, x)
  model.save_pretrained(tmp_path)
  adapter = jlora.peft.load(tmp_path, params, RULES)
  kv = adapter.trainable["attn"]["kv"]["w"]
  assert kv.rank == 5       # two lora_A of ranks 3 and 2, joined
  close(jlora.lora(fn)(adapter.frozen, adapter.trainable, x), want)
  # The spec it returns writes the folder back, and PEFT reads that alike.
  jlora.peft.save(tmp_path / "again", adapter.trainable, RULES, spec=adapter.spec)
  again = peft.PeftModel.from_pretrained(torch_net(params), tmp_path / "again").eval()
  close(torch_out(again, x), want)


def test_a_folder_with_one_module_of_the_kernel_is_refused(base, tmp_path):
  params, _ = base
  cfg = peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)
  peft.get_peft_model(torch_net(params), cfg).save_pretrained(tmp_path)
  with pytest.raises(LoraPeftError) as err:
    jlora.peft.load(tmp_path, params, RULES)
  msg = str(err.value)
  assert "\n" not in msg and "'attn.k_proj' is not" in msg and "'attn/kv/w'" in msg


def test_a_kernel_without_one_entry_per_module_is_refused(base, tmp_path):
  params, _ = base
  spec, _, trainable = adapted(params)
  rules = jlora.peft.Rules(patterns=[("attn/kv", "attn.q_proj+k_proj+v_proj")],
                           kernel_leaves=("w",))
  with pytest.raises(LoraPeftError, match=r"'attn/kv/w'.* 3 PyTorch modules .* has 2 entries"):
    jlora.peft.save(tmp_path, trainable, rules, spec=spec)


def test_dora_on_a_fused_kernel_is_refused(base, tmp_path):
  params, _ = base
  spec, _, trainable = adapted(params, use_dora=True)
  with pytest.raises(LoraPeftError, match=r"'attn/kv/w'.*not a DoRA adapter"):
    jlora.peft.save(tmp_path, trainable, RULES, spec=spec)
