"""``jlora.nnx``'s adapted module against the functional API, side by side.

One NNX model (attention-shaped einsum kernels ``q (D, N, H)``, ``o (N, H,
D)`` and an MLP of ``nnx.Linear``, per layer), the same factors, AdamW on
the factors, one train step three ways:

* ``functional``: ``jax.jit`` of ``jlora.lora(fn)(frozen, trainable, x)``
  with optax on ``trainable`` (docs/frameworks.md's NNX form);
* ``module_jit``: the ``LoraModule`` split once, ``jax.jit`` of a step that
  merges it and runs ``nnx.value_and_grad(..., DiffState(0, LoRAParam))``
  and ``nnx.Optimizer.update`` (NNX's recommended fast form);
* ``module_nnx_jit``: the same step under ``nnx.jit`` (what Tunix's trainer
  does), which adds NNX's per-call graph bookkeeping in Python.

The compiled programs of ``functional`` and ``module_jit`` are compared
instruction by instruction (opcode and result shape, as a multiset): equal
means the wrapper costs nothing in the program itself. Rounds alternate
between the variants; medians are reported.

    python benchmarks/bench_nnx.py [--quick] [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jlora  # noqa: E402
import jlora.nnx  # noqa: E402
import harness  # noqa: E402


class Layer(nnx.Module):
  def __init__(self, d: int, n: int, h: int, rngs: nnx.Rngs):
    self.q = nnx.Einsum("btd,dnh->btnh", (d, n, h), rngs=rngs)
    self.o = nnx.Einsum("btnh,nhd->btd", (n, h, d), rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.o(jax.nn.gelu(self.q(x)))
    return x + self.down(jax.nn.gelu(self.up(x)))


class Model(nnx.Module):
  def __init__(self, d: int, n: int, layers: int, rngs: nnx.Rngs):
    self.layers = nnx.List([Layer(d, n, d // n, rngs) for _ in range(layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _program(compiled_text: str) -> collections.Counter:
  """Opcode and result shape of every instruction of an optimized HLO module."""
  ops = re.findall(r"=\s*([a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+([a-z\-]+)\(", compiled_text)
  return collections.Counter((op, re.sub(r"\{[^}]*\}", "", shape)) for shape, op in ops)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--json")
  opts = parser.parse_args()
  d, n, layers, batch, tokens = (64, 4, 2, 2, 16) if opts.quick else (256, 4, 4, 4, 128)
  x = jax.random.normal(jax.random.key(0), (batch, tokens, d))
  target = jax.random.normal(jax.random.key(1), (batch, tokens, d))
  spec = jlora.LoraSpec(rank=16, alpha=32, targets=r".*/(q|o|up|down)/kernel")
  tx = optax.adamw(1e-3)
  m = jlora.nnx.lora(Model(d, n, layers, nnx.Rngs(0)), spec, rngs=nnx.Rngs(1),
                     example_args=(x,))
  loss_of = lambda y: jnp.mean((y - target) ** 2)  # noqa: E731

  # functional
  graphdef, frozen, trainable = m.split_lora()
  apply = jlora.lora(lambda state, x: nnx.merge(graphdef, state)(x))

  @jax.jit
  def functional(trainable, opt_state, frozen, x):
    value, grads = jax.value_and_grad(lambda t: loss_of(apply(frozen, t, x)))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  state_f = [trainable, tx.init(trainable)]

  def run_functional():
    state_f[0], state_f[1], value = functional(state_f[0], state_f[1], frozen, x)
    return value

  # the module, split once, under jax.jit
  def train_step(model, optimizer, x):
    loss = lambda model: loss_of(model(x))  # noqa: E731
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return value

  m_jit = nnx.merge(*nnx.split(m))
  opt_jit = nnx.Optimizer(m_jit, tx, wrt=nnx.LoRAParam)
  # What a step changes (factors, optimizer state) apart from what it reads
  # alone (the frozen weights), so the frozen weights are not returned.
  weights = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  pair_def, pair_frozen, pair_state = nnx.split((m_jit, opt_jit), weights, ...)

  @jax.jit
  def module_step(pair_state, pair_frozen, x):
    model, optimizer = nnx.merge(pair_def, pair_frozen, pair_state)
    value = train_step(model, optimizer, x)
    return nnx.state((model, optimizer), nnx.Not(weights)), value

  state_m = [pair_state]

  def run_module_jit():
    state_m[0], value = module_step(state_m[0], pair_frozen, x)
    return value

  # the module under nnx.jit
  m_nnx = nnx.merge(*nnx.split(m))
  opt_nnx = nnx.Optimizer(m_nnx, tx, wrt=nnx.LoRAParam)
  nnx_step = nnx.jit(train_step)
  run_nnx_jit = lambda: nnx_step(m_nnx, opt_nnx, x)  # noqa: E731

  losses = {name: float(f()) for name, f in
            [("functional", run_functional), ("module_jit", run_module_jit),
             ("module_nnx_jit", run_nnx_jit)]}
  prog_f = _program(functional.lower(state_f[0], state_f[1], frozen, x).compile().as_text())
  prog_m = _program(module_step.lower(state_m[0], pair_frozen, x).compile().as_text())
  dots = lambda p: sorted(k for k in p.elements() if k[0] in ("dot", "convolution"))  # noqa: E731
  times = harness.interleaved({"functional": run_functional, "module_jit": run_module_jit,
                               "module_nnx_jit": run_nnx_jit}, opts.rounds,
                              block=jax.block_until_ready)
  result = {
      "machine": harness.machine(), "backend": jax.default_backend(),
      "model": dict(d=d, heads=n, layers=layers, batch=batch, tokens=tokens, rank=16),
      "first_loss": losses,
      "same_program": prog_f == prog_m, "same_dots": dots(prog_f) == dots(prog_m),
      "instructions": {"functional": sum(prog_f.values()), "module_jit": sum(prog_m.values())},
      # nnx.Optimizer counts its steps: a few scalar instructions more.
      "only_functional": sorted((prog_f - prog_m).elements()),
      "only_module_jit": sorted((prog_m - prog_f).elements()),
      "step_ms": {k: 1e3 * v for k, v in times.items()},
      "module_jit_over_functional": times["module_jit"] / times["functional"],
      "module_nnx_jit_over_functional": times["module_nnx_jit"] / times["functional"],
  }
  for k, v in result.items():
    print(f"{k}: {v}")
  harness.write_json(opts.json, result)


if __name__ == "__main__":
  main()
