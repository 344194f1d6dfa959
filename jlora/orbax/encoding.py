"""Metadata encoding: LoraSpec fields and adapters' static fields as JSON.

Layouts, dtypes, tuples and mappings are tagged so they decode to what they
were; a callable selector is stored by name only (the loaded spec selects
the saved paths instead).

Example:
  >>> import jax.numpy as jnp, jlora
  >>> encoded = encode(jlora.Layout((0,), (1,)), "layout")
  >>> encoded["__jlora__"], decode(encoded)
  ('layout', Layout(in_axes=(0,), out_axes=(1,), stack_axes=()))
  >>> decode(encode(jnp.bfloat16, "dtype"))
  dtype(bfloat16)
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraCheckpointError, LoraError
from jlora.layout import Layout
from jlora.adapters import adapter as adapter_kinds
# Imported for their kinds' registration (register_kind).
from jlora.adapters import bank as _bank, dora as _dora, lora_param as _lora_param  # noqa: F401
from jlora.spec import LoraSpec
from jlora.orbax import names


def encode(value: Any, what: str) -> Any:
  """JSON form of a spec field or of an adapter's static metadata."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, Layout):
    return {names.TAG: "layout", **{k: list(v) for k, v in dataclasses.asdict(value).items()}}
  dtype = as_dtype(value)
  if dtype is not None:
    return {names.TAG: "dtype", "name": dtype.name}
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    if not all(isinstance(k, str) for k in value):
      raise LoraCheckpointError(f"{what}: mapping keys must be strings to be stored, got {value!r}")
    return {names.TAG: "dict", "items": {k: encode(v, f"{what}[{k!r}]") for k, v in value.items()}}
  if isinstance(value, tuple):
    return {names.TAG: "tuple", "items": [encode(v, what) for v in value]}
  if isinstance(value, list):
    return [encode(v, what) for v in value]
  if callable(value):
    name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return {names.TAG: "callable", "name": name}
  raise LoraCheckpointError(f"{what}: cannot store a {type(value).__name__} ({value!r}) as JSON")


def as_dtype(value: Any) -> np.dtype | None:
  # np.dtype('float32'), np.float32 and jnp.float32 (a class) all name a dtype.
  if isinstance(value, np.dtype):
    return value
  if isinstance(value, type):
    try:
      return jnp.dtype(value)
    except TypeError:
      return None
  return None


class CallableName(NamedTuple):
  name: str


def decode(value: Any) -> Any:
  if isinstance(value, list):
    return [decode(v) for v in value]
  if not isinstance(value, dict):
    return value
  tag = value.get(names.TAG)
  if tag == "layout":
    return Layout(in_axes=tuple(value["in_axes"]), out_axes=tuple(value["out_axes"]),
                  stack_axes=tuple(value["stack_axes"]))
  if tag == "dtype":
    return jnp.dtype(value["name"])
  if tag == "dict":
    return {k: decode(v) for k, v in value["items"].items()}
  if tag == "tuple":
    return tuple(decode(v) for v in value["items"])
  if tag == "callable":
    return CallableName(value["name"])
  raise ValueError(f"unknown encoded value {value!r}")


def exact_regex(paths: list[str]) -> str | None:
  return "|".join(re.escape(p) for p in paths) if paths else None


def encode_spec(spec: LoraSpec) -> dict[str, Any]:
  fields = {f.name: encode(getattr(spec, f.name), f"spec.{f.name}")
            for f in dataclasses.fields(spec)}
  notes = [f"spec.{name} was a callable ({fields[name]['name']}) and is not stored; "
           f"jlora.orbax.load returns a spec that selects the saved paths exactly"
           for name in names.SELECTORS
           if isinstance(fields.get(name), dict) and fields[name].get(names.TAG) == "callable"]
  return {"fields": fields, "notes": notes}


def decode_spec(stored: Mapping[str, Any], lora_paths: list[str], extra_paths: list[str],
                where: str) -> LoraSpec:
  fields = {k: decode(v) for k, v in stored["fields"].items()}
  # A callable selector cannot be stored; the saved paths stand in for it.
  exact = {"targets": exact_regex(lora_paths), "exclude": None,
           "extra_trainable": exact_regex(extra_paths)}
  for name in names.SELECTORS:
    if isinstance(fields.get(name), CallableName):
      fields[name] = exact[name]
  known = {f.name for f in dataclasses.fields(LoraSpec)}
  try:
    return LoraSpec(**{k: v for k, v in fields.items() if k in known})
  except (LoraError, TypeError, ValueError) as e:
    raise LoraCheckpointError(f"{where}: the stored spec is invalid: {e}") from e


def adapter_class(kind: str) -> type | None:
  """The adapter class files call ``kind`` (None for "extra" and unknown kinds)."""
  return adapter_kinds.kind_class(kind)


def static_fields(cls: type) -> list[str]:
  return adapter_kinds.static_fields(cls)


def array_fields(cls: type) -> list[str]:
  return adapter_kinds.array_fields(cls)


def encode_static(leaf: Any, path: str) -> dict[str, Any]:
  """An adapter's static fields as JSON; a field that is None by default and
  None here is left out, so files of plain adapters read as before."""
  defaults = {f.name: f.default for f in dataclasses.fields(leaf)}
  return {name: encode(getattr(leaf, name), f"'{path}' {type(leaf).__name__}.{name}")
          for name in static_fields(type(leaf))
          if not (getattr(leaf, name) is None and defaults.get(name) is None)}


def spec_from_meta(meta: dict[str, Any], path: pathlib.Path) -> LoraSpec | None:
  if meta.get("spec") is None:
    return None
  lora_paths = [e["path"] for e in meta["entries"] if e["kind"] != "extra"]
  extra_paths = [e["path"] for e in meta["entries"] if e["kind"] == "extra"]
  return decode_spec(meta["spec"], lora_paths, extra_paths, f"checkpoint '{path}'")
