"""Optax for adapters: ``optimizer`` (state for the adapters only, per adapter
for a bank), and the LoRA-specific transformations ``lora_plus``, ``lora_fa``
and ``freeze_a``, each a plain ``GradientTransformation`` for any optax chain."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.adapters.dora import DoraParam
from jlora.errors import LoraSpecError, LoraTreeError
from jlora.adapters.lora_param import LoraParam
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.adapters.bank import LoraBank, adapter_ids, bank_names


def optimizer(tx: optax.GradientTransformation, trainable: Any
              ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` for the trainable part returned by ``lora_transform``.

  ``trainable`` holds only A, B and the extra trainable leaves, so optax
  keeps state for those alone. The wrapper checks, at ``init`` and at every
  ``update``, that it is handed a tree of exactly that structure and shapes:
  passing the frozen part, the full parameters or gradients of another tree
  raises ``LoraTreeError`` naming the first mismatching path instead of
  silently allocating optimizer state for W0.

  For a bank of adapters (``jlora.stack_adapters``), the state is kept per
  adapter: ``tx`` runs once per adapter (vmapped over the adapter axis), so
  each adapter is clipped, scheduled and counted as if trained alone. Pass
  the step's ``lora_adapter_ids`` to ``update`` and an adapter with no
  example in the batch takes no step at all (zero update, state unchanged),
  as it would in its own training loop. The ids are validated as ``apply``
  validates them (``LoraTreeError`` for concrete ids out of range, of a
  non-integer dtype or of rank above 1).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"w": jnp.zeros((8, 8))}
    >>> _, trainable = jlora.lora_transform(
    ...     params, jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> tx = jlora.optimizer(optax.adam(1e-3), trainable)
    >>> state = tx.init(trainable)
  """
  expected_def = jax.tree_util.tree_structure(trainable)
  expected = {path: (tuple(leaf.shape), leaf.dtype)
              for path, leaf in flatten_with_paths(trainable)[0] if leaf is not None}

  def check(tree: Any, what: str) -> None:
    if jax.tree_util.tree_structure(tree) == expected_def:
      # Same structure can still be another model's factors (the LoraParam's
      # static scale and layout match, the shapes do not).
      for path, leaf in flatten_with_paths(tree)[0]:
        want = expected.get(path)
        if want is not None and tuple(getattr(leaf, "shape", ())) != want[0]:
          raise LoraTreeError(
              f"jlora.optimizer: {what} has shape {tuple(leaf.shape)} at '{path}' where the "
              f"trainable tree has {want[0]}; pass the trainable part returned by "
              f"lora_transform (or its gradients)")
      return
    got = {path: (tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None))
           for path, leaf in flatten_with_paths(tree, is_leaf=is_adapter)[0]
           if leaf is not None}
    extra = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    hint = ""
    if extra:
      hint = f"'{extra[0]}' (shape {got[extra[0]][0]}) is not trainable"
    elif missing:
      hint = f"'{missing[0]}' is missing"
    raise LoraTreeError(
        f"jlora.optimizer: {what} does not have the structure of the trainable tree "
        f"({hint}); pass the trainable part returned by lora_transform (or its gradients)")

  n_adapters = _bank_size(trainable)
  names = None if n_adapters is None else bank_names(trainable)

  def init(params):
    check(params, "init's argument")
    if n_adapters is None:
      return tx.init(params)
    return jax.vmap(tx.init)(params)

  def update(updates, state, params=None, *, lora_adapter_ids=None, **extra_args):
    check(updates, "the updates")
    if n_adapters is None:
      if lora_adapter_ids is not None:
        raise LoraTreeError("lora_adapter_ids goes with a bank of adapters; this optimizer "
                            "was made for a trainable tree without one")
      return tx.update(updates, state, params, **extra_args)
    if lora_adapter_ids is not None:
      ids = adapter_ids(lora_adapter_ids, names).reshape(-1)   # as apply validates them
    step = lambda u, s, p: tx.update(u, s, p, **extra_args)  # noqa: E731
    new_updates, new_state = jax.vmap(step, in_axes=(0, 0, None if params is None else 0))(
        updates, state, params)
    if lora_adapter_ids is None:
      return new_updates, new_state
    active = jnp.any(ids[:, None] == jnp.arange(n_adapters)[None, :], axis=0)

    def gate(new, old):
      keep = active.reshape((n_adapters,) + (1,) * (jnp.ndim(new) - 1))
      return jnp.where(keep, new, old)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, new_updates)
    return (jax.tree_util.tree_map(gate, new_updates, zeros),
            jax.tree_util.tree_map(gate, new_state, state))

  return optax.GradientTransformationExtraArgs(init, update)


def _bank_size(trainable: Any) -> int | None:
  """The number of adapters of a bank tree; None for a tree without banks."""
  pairs = flatten_with_paths(trainable, is_leaf=is_adapter)[0]
  banks = [(path, leaf) for path, leaf in pairs if isinstance(leaf, LoraBank)]
  if not banks:
    return None
  for path, leaf in pairs:
    if leaf is not None and not isinstance(leaf, LoraBank):
      raise LoraTreeError(f"jlora.optimizer: '{path}' is not a LoraBank, but other weights "
                          f"hold banks; a tree is either one adapter or a bank of them")
  sizes = {leaf.size for _, leaf in banks}
  if len(sizes) != 1:
    raise LoraTreeError(f"jlora.optimizer: the banks hold different numbers of adapters "
                        f"{sorted(sizes)}")
  return sizes.pop()


def _map_factors(fn, updates: Any, params: Any = None) -> Any:
  """``fn(name, update, adapter_params)`` for each factor array of each
  adapter in ``updates`` (``name`` is the field: "a", "b", "magnitude")."""
  is_leaf = lambda x: x is None or is_adapter(x)  # noqa: E731

  def one(u, p):
    if not is_adapter(u):
      return u
    fields = {f.name: getattr(u, f.name) for f in dataclasses.fields(u)
              if not f.metadata.get("static")}
    new = {name: fn(name, value, p) for name, value in fields.items()}
    return dataclasses.replace(u, **new)

  if params is None:
    return jax.tree_util.tree_map(lambda u: one(u, None), updates, is_leaf=is_leaf)
  return jax.tree_util.tree_map(one, updates, params, is_leaf=is_leaf)


def lora_plus(lr_ratio: float) -> optax.GradientTransformation:
  """LoRA+: B learns ``lr_ratio`` times faster than A (Hayou et al., 2024).

  Scales the updates of every B factor; put it after the optimizer, so that
  B's step (weight decay included) is ``lr_ratio`` times A's, as PEFT's
  ``create_loraplus_optimizer`` gives B a learning rate ``lr * lr_ratio``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> _, t = jlora.lora_transform({"w": jnp.ones((8, 8))},
    ...                             jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> tx = optax.chain(optax.adamw(1e-3), jlora.lora_plus(16.0))
    >>> state = tx.init(t)
  """
  if not lr_ratio > 0:
    raise LoraSpecError(f"lr_ratio must be > 0, got {lr_ratio!r}")

  def update(updates, state, params=None):
    del params
    scale = lambda name, u, _: u * jnp.asarray(lr_ratio, u.dtype) if name == "b" else u  # noqa
    return _map_factors(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lora_fa() -> optax.GradientTransformation:
  """LoRA-FA: A frozen, B's gradient projected (Zhang et al., 2023; PEFT's
  ``LoraFAOptimizer``).

  With A fixed, the B whose product ``s B A`` best follows the full
  fine-tuning gradient takes ``g_B (A A^T)^-1 / s^2`` (in PyTorch's (out, r)
  terms); A's gradient is zeroed. Put it before the optimizer, and
  ``jlora.freeze_a()`` after it if the optimizer decays weights:
  ``optax.chain(jlora.lora_fa(), optax.adamw(lr), jlora.freeze_a())``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> _, t = jlora.lora_transform({"w": jnp.ones((8, 8))},
    ...                             jlora.LoraSpec(rank=2, targets=["w"]), key=jax.random.key(0))
    >>> tx = optax.chain(jlora.lora_fa(), optax.adamw(1e-3), jlora.freeze_a())
    >>> state = tx.init(t)
  """

  def update(updates, state, params=None):
    if params is None:
      raise LoraTreeError("jlora.lora_fa needs the parameters: tx.update(grads, state, "
                          "trainable)")

    def project(name, g, p):
      if not isinstance(p, (LoraParam, DoraParam)):
        raise LoraTreeError(f"jlora.lora_fa projects the B of LoRA pairs; got a "
                            f"{type(p).__name__} (a bank's adapters have scales of their own)")
      if name == "a":
        return jnp.zeros_like(g)
      if name != "b":
        return g
      ns = len(p.layout.stack_axes)
      a = p.a.reshape(p.a.shape[:ns] + (-1, p.a.shape[-1])).astype(jnp.float32)
      gram = jnp.swapaxes(a, -1, -2) @ a                      # A A^T in PyTorch's terms
      eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
      inv = jnp.linalg.pinv(gram + 1e-8 * eye)
      gb = g.reshape(g.shape[:ns + 1] + (-1,)).astype(jnp.float32)
      return ((inv @ gb) / p.scale ** 2).reshape(g.shape).astype(g.dtype)

    return _map_factors(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def freeze_a() -> optax.GradientTransformation:
  """Zeroes the updates of every A factor (with ``lora_fa``: A stays fixed
  even under a decaying optimizer).

  Example:
    >>> import optax, jlora
    >>> tx = optax.chain(optax.adamw(1e-3), jlora.freeze_a())
  """

  def update(updates, state, params=None):
    del params
    return _map_factors(lambda name, u, _: jnp.zeros_like(u) if name == "a" else u,
                        updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
