"""``plan``: bytes per device of full fine-tuning, LoRA and QLoRA on a mesh.

``summary(...).memory`` counts a whole model; ``plan`` reads the shardings
the parameters carry (abstract ``jax.ShapeDtypeStruct`` leaves with a
``NamedSharding``, or placed arrays) and counts what the busiest device
holds: each array's shard (``sharding.shard_shape``), under the shardings a
training step would use:

* full fine-tuning: the parameters, their gradients and the optimizer
  state, all sharded as the parameters (optimizer leaves that mirror the
  parameters; the rest, Adam's count, replicated);
* LoRA: the frozen base as placed, the adapters and their optimizer state
  on ``jlora.shardings`` (A and B following W0), gradients as the adapters;
* QLoRA: the same with the base quantized by ``jlora.quantize`` (nothing is
  computed on abstract parameters), each NF4 weight's packed arrays sharded
  like W0 (``jlora.sharding.nf4_shardings``).

Weights, adapters and optimizer state are what a compiled step takes as
arguments, so XLA's ``compiled.memory_analysis().argument_size_in_bytes``
of such a step is their sum plus the batch (``tests/test_plan.py`` checks it
exactly); gradients and activations live in its temporaries, which
``activations`` estimates from ``summary``'s count (every matmul's input and
output, per token; rematerialization keeps less).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jlora._paths import flatten_with_paths
from jlora.errors import LoraTreeError
from jlora.layout import Layout
from jlora.optim import optimizer
from jlora.quant import quantize
from jlora.quant.nf4 import NF4Array
from jlora.sharding import _opt_shardings, leaf_sharding, nf4_shardings, shardings
from jlora.spec import LoraSpec
from jlora.summary import COMPONENTS, SETUPS, MemoryTable, summary
from jlora.transform import lora_transform


@dataclasses.dataclass(frozen=True)
class Plan:
  """What each device of a mesh holds, for full fine-tuning, LoRA and QLoRA.

  Attributes:
    mesh: the mesh's axis sizes (``{"data": 8}``).
    per_device: bytes on the busiest device, per setup and component (a
      ``MemoryTable``: ``total``, ``headroom``, ``fits``...).
    model: the whole model's table (``summary(...).memory``), for reference.
    shardings: setup -> ``{"weights", "adapters", "optimizer state"}`` ->
      the tree of shardings counted (the ``in_shardings`` of a step).
    abstract: setup -> the same trees of abstract arrays.
  """

  mesh: dict[str, int]
  per_device: MemoryTable
  model: MemoryTable
  shardings: dict[str, dict[str, Any]] = dataclasses.field(repr=False, compare=False)
  abstract: dict[str, dict[str, Any]] = dataclasses.field(repr=False, compare=False)

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def __str__(self) -> str:
    return (f"bytes per device on a mesh {self.mesh} ({self.devices} devices):\n"
            f"{self.per_device}")


def shard_bytes(leaf: Any, sharding: Any = None) -> int:
  """Bytes one device holds of an array (the largest shard): all of it
  without a NamedSharding.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> shard_bytes(jax.ShapeDtypeStruct((8, 4), jnp.float32), NamedSharding(mesh, P("data")))
    128
  """
  sharding = leaf_sharding(leaf) if sharding is None else sharding
  shape = tuple(leaf.shape)
  if isinstance(sharding, NamedSharding):
    shape = sharding.shard_shape(shape)
  return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def tree_bytes(tree: Any, tree_shardings: Any) -> int:
  """Bytes one device holds of every array of ``tree`` placed on ``tree_shardings``."""
  leaves = jax.tree_util.tree_leaves(tree)
  sh = jax.tree_util.tree_leaves(tree_shardings)
  if len(leaves) != len(sh):
    raise LoraTreeError("plan: a tree and its shardings differ in structure")
  return sum(shard_bytes(x, s) for x, s in zip(leaves, sh))


def _abstract(params: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=leaf_sharding(x)), params)


def _bare(tree: Any) -> Any:
  """Abstract arrays without shardings: shapes and dtypes only (computing on
  them never meets a mesh's sharding rules)."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def base_shardings(frozen: Any, params: Any, default: NamedSharding) -> Any:
  """The shardings of a (quantized) frozen tree: each leaf as the same path
  of ``params`` (the dense tree, with shardings), an ``NF4Array``'s packed
  arrays as ``nf4_shardings`` derives them from its dense W0's; ``default``
  where ``params`` has none."""
  f_pairs, f_def = flatten_with_paths(frozen)
  dense = dict(flatten_with_paths(params)[0])
  out = []
  for path, leaf in f_pairs:
    w0 = dense.get(path)
    if leaf is None:
      out.append(None)
    elif isinstance(leaf, NF4Array):
      derived = nf4_shardings(leaf, leaf_sharding(w0))
      out.append(derived if derived is not None
                 else jax.tree_util.tree_map(lambda _: default, leaf))
    else:
      out.append(_named(leaf_sharding(w0), default))
  return f_def.unflatten(out)


def plan(params: Any, spec: LoraSpec, *, tx: Any = None,
         layouts: Mapping[str, Layout] | None = None, quantize_targets: Any = None,
         block_size: int = 64, double_quant: bool = True, batch: int | None = None,
         seq_len: int | None = None, data_axes: Sequence[str] | None = None,
         activation_dtype: Any = None, device_memory: int | None = None) -> Plan:
  """Bytes per device of full fine-tuning, LoRA and QLoRA of ``params`` on
  the mesh their shardings name, without allocating anything.

  Args:
    params: the parameters with their shardings: abstract
      (``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))``,
      e.g. ``jax.eval_shape(model.init, ...)`` with shardings added) or placed
      arrays. Leaves without a NamedSharding count as replicated.
    spec: the LoRA spec.
    tx: the optax transformation (default: ``optax.adam``); its state is
      computed abstractly for the full parameters and, wrapped in
      ``jlora.optimizer``, for the adapters.
    layouts: path -> Layout, as ``lora_transform`` and ``quantize`` take
      (``jlora.infer_layouts``; needed for weights that are not 2-D).
    quantize_targets: what QLoRA quantizes (``jlora.quantize``'s ``targets``).
    block_size: the NF4 block size of the QLoRA column (``jlora.quantize``'s).
    double_quant: whether QLoRA quantizes the absmax too (``jlora.quantize``'s).
    batch: the batch size; give it with ``seq_len`` to estimate activations.
    seq_len: the sequence length; give it with ``batch``.
    data_axes: the mesh axes the batch is split over (default: all of them,
      as with FSDP or data parallelism).
    activation_dtype: the activations' dtype (default: each weight's).
    device_memory: a device's bytes, for ``per_device.headroom`` and ``fits``.

  Returns:
    A ``Plan``; ``print(plan)`` shows the table.

  Raises:
    LoraTreeError: no leaf of ``params`` carries a NamedSharding.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> w = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16,
    ...                          sharding=NamedSharding(mesh, P("data", None)))
    >>> p = jlora.plan({"kernel": w}, jlora.LoraSpec(rank=8, targets=["kernel"]))
    >>> p.per_device.rows["full"]["optimizer state"], p.per_device.rows["lora"]["adapters"]
    (131076, 12288)
  """
  import optax
  abstract = _abstract(params)
  meshes = [s.mesh for s in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(leaf_sharding, abstract)) if isinstance(s, NamedSharding)]
  if not meshes:
    raise LoraTreeError("plan: no parameter carries a NamedSharding; give params the "
                        "shardings of the mesh to plan for (jax.ShapeDtypeStruct(..., "
                        "sharding=NamedSharding(mesh, spec)))")
  mesh = meshes[0]
  tx = optax.adam(1e-4) if tx is None else tx
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

  def own(tree):
    return jax.tree_util.tree_map(lambda x: _named(leaf_sharding(x), replicated), tree)

  # Full fine-tuning: everything follows the parameters.
  p_sh = own(abstract)
  full_state = jax.eval_shape(tx.init, _bare(abstract))
  full_state_sh = _opt_shardings(abstract, tx, p_sh, replicated)
  weights_full = tree_bytes(abstract, p_sh)

  # LoRA: the frozen base as placed; adapters and their state on jlora.shardings.
  frozen, trainable = lora_transform(abstract, spec, layouts=layouts)
  ltx = optimizer(tx, trainable)
  sh = shardings(trainable, ltx, base=abstract)
  state = jax.eval_shape(ltx.init, _bare(trainable))
  f_sh = own(frozen)
  adapters = tree_bytes(trainable, sh.trainable)
  opt = tree_bytes(state, sh.opt_state)

  # QLoRA: the frozen base quantized (abstractly), NF4 sharded like W0.
  q_layouts = dict(layouts or {})
  for path, _ in flatten_with_paths(frozen)[0]:
    override = spec.layout_override(path)
    if override is not None:
      q_layouts[path] = override
  q_frozen = quantize(_bare(frozen), quantize_targets, block_size=block_size,
                      double_quant=double_quant, layouts=q_layouts)
  q_sh = base_shardings(q_frozen, abstract, replicated)

  whole = summary(abstract, spec, layouts=layouts, batch=batch, seq_len=seq_len,
                  quantize_targets=quantize_targets, block_size=block_size,
                  double_quant=double_quant, activation_dtype=activation_dtype).memory
  acts = 0
  if batch is not None and seq_len is not None:
    axes = tuple(mesh.axis_names) if data_axes is None else tuple(data_axes)
    split = math.prod(mesh.shape[a] for a in axes)
    acts = whole.activation_bytes_per_token * (-(-batch * seq_len // split))
  rows = {
      "full": {"weights": weights_full, "adapters": 0, "gradients": weights_full,
               "optimizer state": tree_bytes(full_state, full_state_sh), "activations": acts},
      "lora": {"weights": tree_bytes(frozen, f_sh), "adapters": adapters, "gradients": adapters,
               "optimizer state": opt, "activations": acts},
      "qlora": {"weights": tree_bytes(q_frozen, q_sh), "adapters": adapters,
                "gradients": adapters, "optimizer state": opt, "activations": acts},
  }
  assert set(rows) == set(SETUPS) and all(set(r) == set(COMPONENTS) for r in rows.values())
  tokens = batch * seq_len if batch is not None and seq_len is not None else None
  per_device = MemoryTable(rows, tokens, None if device_memory is None else int(device_memory),
                           whole.activation_bytes_per_token)
  trees = {
      "full": {"weights": (abstract, p_sh), "optimizer state": (full_state, full_state_sh)},
      "lora": {"weights": (frozen, f_sh), "adapters": (trainable, sh.trainable),
               "optimizer state": (state, sh.opt_state)},
      "qlora": {"weights": (q_frozen, q_sh), "adapters": (trainable, sh.trainable),
                "optimizer state": (state, sh.opt_state)},
  }
  return Plan(dict(mesh.shape), per_device, whole,
              shardings={k: {c: v[1] for c, v in d.items()} for k, d in trees.items()},
              abstract={k: {c: v[0] for c, v in d.items()} for k, d in trees.items()})


def _named(sharding: Any, replicated: NamedSharding) -> NamedSharding:
  return sharding if isinstance(sharding, NamedSharding) else replicated
