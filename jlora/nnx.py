"""``jlora.nnx``: LoRA for Flax NNX modules, in NNX's own idiom.

``jlora.nnx.lora(model, spec, ...)`` returns a ``LoraModule``: an
``nnx.Module`` that stands for the adapted ``model``. It holds

* ``base_model``: a copy of ``model`` (same class, same ``nnx.Param`` and
  other variables; the arrays are shared, the user's module is left as it
  is), with W0 as it was, or NF4 (``jlora.nnx.quantize``), or the residual of
  a base-changing init (PiSSA, OLoRA, LoftQ);
* ``lora``: the factors, one small module per adapted weight in a tree of
  ``nnx.Dict`` that mirrors the weight's path (``lora/fc1/kernel/a``; a
  segment that names an ``nnx.Dict`` method or starts with ``_`` gets a
  trailing ``_``: ``lora/items_/kernel``), each array an ``nnx.LoRAParam``.

So NNX's tools that select by variable type see what they expect:
``nnx.state(m, nnx.LoRAParam)`` is the adapter, ``nnx.Optimizer(m, tx,
wrt=nnx.LoRAParam)`` and ``nnx.DiffState(0, nnx.LoRAParam)`` train the
factors alone, and ``nnx.jit``, ``nnx.split``/``nnx.merge`` and orbax's NNX
checkpointing carry the module as any other.

Calling the module, and calling any method of the original class on it
(``m.init_cache(...)``, ``m.encode(...)``), runs that method of
``base_model`` through ``jlora.lora``'s interpreter: each use of an adapted
weight is ``x W0 + s (x A) B``, never a merged weight, and no gradient flows
to W0. The method's updates to variables other than ``nnx.Param`` (a KV
cache, batch statistics, RNG counters) are written back. Every other
attribute (``m.config``, ``m.layers``, a property) is the original's, read
from ``base_model`` as it is: a submodule reached that way and called on its
own runs on the base weights alone, without the adapter.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, Sequence

import jax
from flax import nnx

from jlora import transform
from jlora._paths import flatten_with_paths, path_str
from jlora.adapters.adapter import array_fields, is_adapter, static_fields
from jlora.adapters.bank import stack_adapters
from jlora.errors import LoraLayoutError, LoraSpecError
from jlora.interpret import infer_layouts, lora as _lora
from jlora.layout import Layout
from jlora.merge import merge as _merge
from jlora.quant import quantize as _quantize
from jlora.spec import LoraSpec

__all__ = ["LoraModule", "lora", "merge", "quantize", "stack"]


class _Factors(nnx.Module):
  """The arrays of one adapter as ``nnx.LoRAParam``; its class and static
  fields (scale, layout, ...) are static attributes, so they live in the
  graph definition, not the state."""

  def __init__(self, adapter: Any):
    self.kind = type(adapter)
    self.static = tuple((f, getattr(adapter, f)) for f in static_fields(self.kind))
    for f in array_fields(self.kind):
      setattr(self, f, nnx.LoRAParam(getattr(adapter, f)))

  def adapter(self) -> Any:
    arrays = {f: getattr(self, f).get_value() for f in array_fields(self.kind)}
    return self.kind(**arrays, **dict(self.static))


def _forward(state: Any, graphdef: Any, method: str, *args, **kwargs):
  """The function ``jlora.lora`` wraps: the method of the merged module, and
  the state of its variables other than ``nnx.Param`` after the call."""
  module = nnx.merge(graphdef, state)
  out = getattr(module, method)(*args, **kwargs)
  return out, nnx.state(module, nnx.Not(nnx.Param))


@functools.cache
def _apply(bank_dot: str):
  # One transformed function per strategy, shared by every LoraModule: its
  # trace cache is keyed by the graph definition (a static argument) and the
  # state's structure and shapes, so each model and method is traced once.
  return _lora(_forward, bank_dot=bank_dot)


_KEYWORDS = tuple(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                  for name in ("lora_dropout_key", "lora_adapter_ids"))


def _signature(method: Any) -> inspect.Signature:
  """``method``'s signature with the keywords the adapted call adds."""
  sig = inspect.signature(method)
  params = list(sig.parameters.values())
  extra = [p for p in _KEYWORDS if p.name not in sig.parameters]
  at = len(params) - bool(params and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
  return sig.replace(parameters=params[:at] + extra + params[at:])


class _Method:
  """A method of the original class run on the adapted module (``m.__call__``,
  ``m.init_cache``). ``inspect.signature`` reads the original method's
  parameters (frameworks look for ``cache`` or ``decode_only_last_token``
  there), plus ``lora_dropout_key`` and ``lora_adapter_ids``."""

  __slots__ = ("_module", "_name")

  def __init__(self, module: "LoraModule", name: str):
    self._module, self._name = module, name

  def __call__(self, *args, **kwargs):
    return self._module._run(self._name, *args, **kwargs)

  @property
  def __signature__(self) -> inspect.Signature:
    return _signature(getattr(self._module.base_model, self._name))

  def __repr__(self) -> str:
    return f"<adapted method {type(self._module.base_model).__name__}.{self._name}>"


class _AdaptedCall:
  """``LoraModule.__call__``: calling the module, or reading ``m.__call__``,
  gives a ``_Method`` of this instance, so the signature is per instance."""

  def __get__(self, obj: Any, objtype: Any = None) -> Any:
    return self if obj is None else _Method(obj, "__call__")


class _CallSignature:
  """``inspect.signature(m)``: the wrapped module's call signature. Read on
  the class, there is none (inspect then reads ``__init__``)."""

  def __get__(self, obj: Any, objtype: Any = None) -> inspect.Signature:
    if obj is None:
      raise AttributeError("__signature__")
    return _signature(obj.base_model.__call__)


# nnx.Module's own methods (train, eval, sow, ...) act on the wrapper itself.
_MODULE_NAMES = frozenset(dir(nnx.Module))
# nnx.Dict keeps its items as attributes, so a path segment that names one of
# its methods (keys, items, update, ...) or starts with "_" is stored with a
# trailing "_" in the tree of factors.
_DICT_NAMES = frozenset(dir(nnx.Dict))


def _node_name(segment: str) -> str:
  return f"{segment}_" if segment in _DICT_NAMES or segment.startswith("_") else segment


class LoraModule(nnx.Module):
  """An NNX module adapted by LoRA; made by ``jlora.nnx.lora``.

  Attributes:
    base_model: the original module with the frozen weights (``nnx.Param``).
    lora: the factors (``nnx.LoRAParam``), a tree of ``nnx.Dict`` mirroring
      the adapted weights' paths.

  Calling it takes the original's arguments, plus ``lora_dropout_key`` and
  ``lora_adapter_ids`` as ``jlora.lora``'s transformed function does, and
  ``inspect.signature`` of the module, of ``m.__call__`` and of any method
  of the original reached on it says so.
  """

  def __init__(self, base_model: nnx.Module, adapters: Mapping[str, Any], *,
               extra_paths: Sequence[str] = (), bank_dot: str = "auto"):
    self.base_model = base_model
    self.lora = nnx.Dict()
    for path, adapter in adapters.items():
      node = self.lora
      *parents, leaf = map(_node_name, path.split("/"))
      for name in parents:
        if name not in node:
          node[name] = nnx.Dict()
        node = node[name]
      node[leaf] = _Factors(adapter)
    self.lora_paths = tuple(adapters)
    # Weights trained in full (extra_trainable): nnx.LoRAParam in base_model.
    self.extra_paths = tuple(extra_paths)
    self.bank_dot = bank_dot

  def adapters(self) -> dict[str, Any]:
    """Path -> the adapter (``jlora.LoraParam``, ``DoraParam``, ``LoraBank``)
    built from the current ``nnx.LoRAParam`` values."""
    out = {}
    for path in self.lora_paths:
      node = self.lora
      for name in map(_node_name, path.split("/")):
        node = node[name]
      out[path] = node.adapter()
    return out

  def split_lora(self) -> tuple[Any, Any, Any]:
    """``(graphdef, frozen, trainable)`` of ``base_model`` in the functional
    API's form: ``jlora.lora(fn)(frozen, trainable, ...)`` and
    ``jlora.merge(frozen, trainable)`` take the last two. A weight trained
    in full is in ``trainable`` (None in ``frozen``), as there."""
    graphdef, state = nnx.split(self.base_model)
    pairs, treedef = flatten_with_paths(state)
    adapters, extras = self.adapters(), set(self.extra_paths)
    trainable = treedef.unflatten([leaf if path in extras else adapters.get(path)
                                   for path, leaf in pairs])
    if extras:
      state = treedef.unflatten([None if path in extras else leaf for path, leaf in pairs])
    return graphdef, state, trainable

  # Calls take the original's arguments; inspect.signature(m) and
  # inspect.signature(m.__call__) report them (see _Method).
  __call__ = _AdaptedCall()
  __signature__ = _CallSignature()

  def _run(self, method: str, *args, lora_dropout_key=None, lora_adapter_ids=None, **kwargs):
    graphdef, frozen, trainable = self.split_lora()
    out, updates = _apply(self.bank_dot)(frozen, trainable, graphdef, method, *args,
                                          lora_dropout_key=lora_dropout_key,
                                          lora_adapter_ids=lora_adapter_ids, **kwargs)
    if jax.tree_util.tree_leaves(updates):
      nnx.update(self.base_model, updates)
    return out

  def __getattr__(self, name: str) -> Any:
    # Reached only for names the wrapper lacks: the original's attributes.
    base = vars(self).get("base_model")
    if base is None or "__" in name:   # dunders and NNX's own (_pytree__...)
      raise AttributeError(name)
    attr = getattr(base, name)
    if (inspect.ismethod(attr) and attr.__self__ is base and name not in _MODULE_NAMES):
      return _Method(self, name)
    return attr


def _retype(state: Any, paths: set[str], cls: type) -> Any:
  """``state`` with the variables at ``paths`` of type ``cls``."""
  def retype(kp, v):
    if isinstance(v, nnx.Variable) and path_str(kp) in paths:
      return cls(v.get_value(), **v.get_metadata())
    return v
  return jax.tree_util.tree_map_with_path(retype, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def _extra_paths(state: Any, pairs, extras: list[int]) -> tuple[str, ...]:
  """The paths of the weights trained in full; each must be an ``nnx.Param``."""
  kinds = {path_str(kp): type(v) for kp, v in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  for i in extras:
    path = pairs[i][0]
    if not issubclass(kinds.get(path, object), nnx.Param):
      raise LoraSpecError(
          f"'{path}' matches extra_trainable but is a {kinds.get(path, object).__name__}, "
          f"not an nnx.Param; only weights can be trained in full")
  return tuple(pairs[i][0] for i in extras)


def _key(key: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array | None:
  if key is not None and rngs is not None:
    raise LoraSpecError("jlora.nnx.lora takes key= or rngs=, not both")
  return rngs.params() if rngs is not None else key


def _layouts(model: nnx.Module, state: Any, example_args: Sequence[Any] | None,
             example_kwargs: Mapping[str, Any] | None,
             layouts: Mapping[str, Layout] | None) -> dict[str, Layout]:
  """The given layouts over those inferred from the example inputs."""
  out: dict[str, Layout] = {}
  if example_args is not None or example_kwargs is not None:
    graphdef = nnx.graphdef(model)
    fn = lambda s, *a, **k: _forward(s, graphdef, "__call__", *a, **k)  # noqa: E731
    out.update(infer_layouts(fn, state, *(example_args or ()), **(example_kwargs or {})))
  out.update(layouts or {})
  return out


def _check_layouts(pairs, targets: list[int], spec: LoraSpec, layouts: Mapping[str, Layout]):
  for i in targets:
    path, leaf = pairs[i]
    if (spec.layout_override(path) is None and path not in layouts
        and Layout.default(len(leaf.shape)) is None):
      raise LoraLayoutError(
          f"'{path}': cannot tell which axes of this {len(leaf.shape)}-D weight (shape "
          f"{tuple(leaf.shape)}) the model contracts. Pass example_args=(...) (the "
          f"model's inputs, read abstractly) or layouts={{path: jlora.Layout(...)}} to "
          f"jlora.nnx.lora")


def lora(model: nnx.Module, spec: LoraSpec, *, key: jax.Array | None = None,
         rngs: nnx.Rngs | None = None, example_args: Sequence[Any] | None = None,
         example_kwargs: Mapping[str, Any] | None = None,
         layouts: Mapping[str, Layout] | None = None, bank_dot: str = "auto") -> LoraModule:
  """Adapts an NNX module: a ``LoraModule`` that behaves as ``model`` with
  each selected weight ``W0 + s B A``.

  ``model`` is not modified. Paths are those of ``nnx.split(model)``'s state
  as ``jlora.lora_transform`` names them (``layers/0/attn/q_proj/w``).

  Args:
    model: the module to adapt (its weights may be ``NF4Array`` values, from
      ``jlora.nnx.quantize``).
    spec: what to adapt (``jlora.LoraSpec``). Weights it names in
      ``extra_trainable`` are trained in full: they become ``nnx.LoRAParam``
      in ``base_model``, so whatever selects ``nnx.LoRAParam`` (an
      ``nnx.Optimizer``, ``DiffState``, Tunix's trainer and checkpoints)
      trains and saves them with the factors.
    key: PRNG key for A's initialisation (or ``rngs``).
    rngs: an ``nnx.Rngs``; its ``params`` stream gives the key.
    example_args: example inputs of ``model(...)`` (arrays or
      ``jax.ShapeDtypeStruct``; read abstractly), from which
      ``jlora.infer_layouts`` reads the layout of each multi-axis kernel
      (``nnx.Einsum``, ``nnx.LinearGeneral``, einsum weights).
    example_kwargs: keyword inputs of ``model(...)``, with ``example_args``.
    layouts: path -> ``jlora.Layout``; these win over inferred ones.
    bank_dot: how a bank of adapters computes a mixed batch (see
      ``jlora.lora``).

  Returns:
    The adapted module.

  Raises:
    LoraLayoutError: a selected weight that is not 2-D has no layout.
    LoraSpecError: as ``jlora.lora_transform``, and for an
      ``extra_trainable`` match that is not an ``nnx.Param``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
    >>> m = jlora.nnx.lora(model, spec, rngs=nnx.Rngs(1))
    >>> m(jnp.ones((3, 8))).shape, m.in_features
    ((3, 4), 8)
    >>> lora = nnx.state(m, nnx.LoRAParam)   # the factors: ["lora"]["kernel"]["a"], ["b"]
    >>> type(lora["lora"]["kernel"]["a"]).__name__, lora["lora"]["kernel"]["a"].shape
    ('LoRAParam', (8, 2))
  """
  if not isinstance(model, nnx.Module):
    raise LoraSpecError(f"jlora.nnx.lora takes an nnx.Module, got {type(model).__name__}")
  key = _key(key, rngs)
  graphdef, state = nnx.split(model)
  pairs, _ = flatten_with_paths(state)
  targets, extras = transform.select_targets(pairs, spec)
  extra_paths = _extra_paths(state, pairs, extras)
  layouts = _layouts(model, state, example_args, example_kwargs, layouts)
  _check_layouts(pairs, targets, spec, layouts)
  frozen, trainable = transform.lora_transform(state, spec, key=key,
                                               layouts=layouts)
  t_pairs, _ = flatten_with_paths(trainable, is_leaf=is_adapter)
  adapters = {path: t for path, t in t_pairs if is_adapter(t)}
  if extra_paths:   # back into the base, as nnx.LoRAParam
    f_pairs, f_def = flatten_with_paths(frozen)
    frozen = f_def.unflatten([t if path in extra_paths else f
                              for (path, f), (_, t) in zip(f_pairs, t_pairs)])
    frozen = _retype(frozen, set(extra_paths), nnx.LoRAParam)
  return LoraModule(nnx.merge(graphdef, frozen), adapters, extra_paths=extra_paths,
                    bank_dot=bank_dot)


def merge(model: LoraModule, *, dtype: Any = None) -> nnx.Module:
  """The plain module of the original class with each adapted weight
  ``W0 + s B A`` (as ``jlora.merge``; an NF4 W0 is dequantized).

  Example:
    >>> import jax.numpy as jnp, jlora, jlora.nnx
    >>> from flax import nnx
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
    >>> m = jlora.nnx.lora(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), spec, rngs=nnx.Rngs(1))
    >>> type(jlora.nnx.merge(m)).__name__
    'Linear'
  """
  if not isinstance(model, LoraModule):
    raise LoraSpecError(f"jlora.nnx.merge takes a LoraModule (from jlora.nnx.lora), got "
                        f"{type(model).__name__}")
  graphdef, frozen, trainable = model.split_lora()
  kwargs = {} if dtype is None else {"dtype": dtype}
  merged = _merge(frozen, trainable, **kwargs)
  # Weights trained in full are plain weights again.
  return nnx.merge(graphdef, _retype(merged, set(model.extra_paths), nnx.Param))


def stack(modules: Mapping[str, LoraModule], *, bank_dot: str = "auto") -> LoraModule:
  """One module with the adapters of several, as a bank (``jlora.stack_adapters``).

  All must adapt the same base (the first one's ``base_model`` is kept).
  Call it with ``lora_adapter_ids`` (each example's adapter, -1 for the base
  model), as ``jlora.lora``'s transformed function.

  Example:
    >>> import jax.numpy as jnp, jlora, jlora.nnx
    >>> from flax import nnx
    >>> base = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["kernel"])
    >>> ms = {n: jlora.nnx.lora(base, spec, rngs=nnx.Rngs(i)) for i, n in enumerate("xy")}
    >>> bank = jlora.nnx.stack(ms)
    >>> bank(jnp.ones((2, 8)), lora_adapter_ids=jnp.array([0, 1])).shape
    (2, 4)
  """
  if not modules or not all(isinstance(m, LoraModule) for m in modules.values()):
    raise LoraSpecError("jlora.nnx.stack takes a non-empty mapping of name -> LoraModule")
  for name, m in modules.items():
    if m.extra_paths:
      raise LoraSpecError(
          f"jlora.nnx.stack: '{m.extra_paths[0]}' of '{name}' is trained in full "
          f"(extra_trainable), but a bank shares one base; stack adapters without it")
  trees = {name: m.split_lora()[2] for name, m in modules.items()}
  bank = stack_adapters(trees)
  pairs, _ = flatten_with_paths(bank, is_leaf=is_adapter)
  first = next(iter(modules.values()))
  base = nnx.clone(first.base_model)   # its own variables (split/merge would share them)
  return LoraModule(base, {p: t for p, t in pairs if is_adapter(t)}, bank_dot=bank_dot)


def quantize(model: nnx.Module, targets: Any = None, *, block_size: int = 64,
             double_quant: bool = True, example_args: Sequence[Any] | None = None,
             example_kwargs: Mapping[str, Any] | None = None,
             layouts: Mapping[str, Layout] | None = None) -> nnx.Module:
  """A copy of ``model`` with the selected weights stored in NF4 (as
  ``jlora.quantize``), to adapt with ``jlora.nnx.lora`` (QLoRA).

  The copy holds ``jlora.NF4Array`` values in its ``nnx.Param`` variables,
  so it runs only through ``jlora.nnx.lora``'s module, which dequantizes
  each weight where it is used. Layouts come from ``example_args`` or
  ``layouts`` as in ``jlora.nnx.lora``.

  Example:
    >>> import jlora, jlora.nnx
    >>> from flax import nnx
    >>> q = jlora.nnx.quantize(nnx.Linear(64, 64, rngs=nnx.Rngs(0)))
    >>> type(q.kernel.get_value()).__name__
    'NF4Array'
  """
  graphdef, state = nnx.split(model)
  layouts = _layouts(model, state, example_args, example_kwargs, layouts)
  return nnx.merge(graphdef, _quantize(state, targets, block_size=block_size,
                                       double_quant=double_quant, layouts=layouts))
