"""``optimizer``: an optax transformation that checks it only sees adapters."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora.errors import LoraTreeError
from jlora._paths import flatten_with_paths
from jlora.lora_param import LoraParam


def optimizer(tx: optax.GradientTransformation, trainable: Any
              ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` for the trainable part returned by ``lora_transform``.

  ``trainable`` holds only A, B and the extra trainable leaves, so optax
  keeps state for those alone. The wrapper checks, at ``init`` and at every
  ``update``, that it is handed a tree of exactly that structure and shapes:
  passing the frozen part, the full parameters or gradients of another tree
  raises ``LoraTreeError`` naming the first mismatching path instead of
  silently allocating optimizer state for W0.

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
           for path, leaf in flatten_with_paths(tree, is_leaf=lambda x: isinstance(x, LoraParam))[0]
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

  def init(params):
    check(params, "init's argument")
    return tx.init(params)

  def update(updates, state, params=None, **extra_args):
    check(updates, "the updates")
    if extra_args:
      return tx.update(updates, state, params, **extra_args)
    return tx.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(init, update)
