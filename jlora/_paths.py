"""Parameter paths: the '/'-joined names that specs match against."""

from __future__ import annotations

from typing import Any, Callable

import jax

KeyPath = tuple[Any, ...]


def _key_name(entry: Any) -> str:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_str(key_path: KeyPath) -> str:
  """Returns the '/'-joined name of a JAX key path.

  A trailing ``.value`` (the array inside a Flax NNX ``Variable``) is
  dropped, so an NNX kernel is named ``.../kernel`` as in Linen.

  Example:
    >>> import jax
    >>> kp, _ = jax.tree_util.tree_flatten_with_path({"dense": {"kernel": 1}})
    >>> path_str(kp[0][0])
    'dense/kernel'
  """
  names = [_key_name(e) for e in key_path]
  if (len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
      and names[-1] == "value"):
    names = names[:-1]
  return "/".join(names)


def is_none(x: Any) -> bool:
  return x is None


# Pytree node types that stand for one parameter (a quantized weight is a
# node whose children are its packed arrays): paths and specs see them whole.
_WEIGHT_NODES: tuple[type, ...] = ()


def register_weight_node(node_type: type) -> None:
  """Makes ``flatten_with_paths`` keep nodes of ``node_type`` as one leaf."""
  global _WEIGHT_NODES
  if node_type not in _WEIGHT_NODES:
    _WEIGHT_NODES = _WEIGHT_NODES + (node_type,)


def is_weight_node(x: Any) -> bool:
  return isinstance(x, _WEIGHT_NODES)


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                       ) -> tuple[list[tuple[str, Any]], Any]:
  """Flattens a tree keeping None (and a registered weight node, such as an
  ``NF4Array``) as a leaf; returns [(path, leaf)], treedef."""
  def leaf_pred(x):
    return x is None or is_weight_node(x) or (is_leaf is not None and is_leaf(x))
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf_pred)
  return [(path_str(kp), leaf) for kp, leaf in pairs], treedef
