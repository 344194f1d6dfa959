"""The ``jlora`` command line: inspect, merge and convert adapters as files.

::

  jlora inspect PATH [--json]
  jlora merge --base BASE --adapter ADAPTER --out OUT [--format orbax|safetensors]
  jlora convert SRC DST --to peft|orbax [--rules generic|gpt2|scanned] [--base BASE]

An *adapter* is either a jlora orbax adapter directory (``jlora.save_adapter``
or a ``CheckpointManager`` step) or a PEFT LoRA folder (``jlora.save_peft`` or
PyTorch PEFT's ``save_pretrained``).

A *base* (the parameters an adapter is applied to) is a file or directory
written by ``jlora.save_params`` (see ``jlora.base_files``); ``merge`` writes
its output in the same forms, so a merged model is again a base.

Only JSON, orbax and safetensors are read: nothing is unpickled and no code
from a file runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import pathlib
import re
import string
import sys
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraError
from jlora._paths import flatten_with_paths
from jlora.base_files import (_PARAMS_META, CliError, _is_safetensors, _read_params,
                              save_params)
from jlora.lora_param import LoraParam
from jlora.layout import Layout
from jlora.spec import LoraSpec

PathLike = str | os.PathLike

_PEFT_CONFIG, _PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


# -- parameter files ------------------------------------------------------------


def _kind(path: PathLike) -> str:
  """'jlora' (orbax adapter), 'peft' (folder) or 'params'; else a CliError."""
  p = pathlib.Path(path)
  if not p.exists():
    raise CliError(f"'{path}' does not exist")
  if p.is_file():
    if _is_safetensors(p):
      return "params"
    if p.name in (_PEFT_CONFIG, _PEFT_WEIGHTS):
      raise CliError(f"'{path}' is a file of a PEFT folder; pass the folder '{p.parent}'")
    raise CliError(f"'{path}' is a file, not an adapter: expected a jlora adapter "
                   f"directory or a PEFT folder")
  if (p / "adapter_meta").is_dir():
    return "jlora"
  if (p / _PEFT_CONFIG).is_file():
    return "peft"
  if (p / _PARAMS_META).is_dir() or (p / "_METADATA").is_file():
    return "params"
  if any(c.name.isdigit() and (c / "adapter_meta").is_dir() for c in p.iterdir()):
    raise CliError(f"'{path}' is a CheckpointManager directory, not an adapter: pass one "
                   f"of its steps ('{p / 'STEP'}')")
  raise CliError(f"'{path}' is not an adapter: it has neither 'adapter_meta/' (a jlora "
                 f"adapter) nor '{_PEFT_CONFIG}' (a PEFT folder)")


def _adapter_kind(path: PathLike) -> str:
  kind = _kind(path)
  if kind == "params":
    raise CliError(f"'{path}' is a params checkpoint (a base), not an adapter")
  return kind


# -- PEFT name rules and layouts ----------------------------------------------------


def _rules(args: argparse.Namespace):
  import jlora
  name = args.rules
  renames = {}
  for item in args.rename or ():
    flax, sep, torch = item.partition("=")
    if not sep or not flax or not torch:
      raise CliError(f"--rename expects FLAX=TORCH (e.g. query=self_attn.q_proj), got "
                     f"{item!r}")
    renames[flax] = torch
  scanned_only = {"--stack": args.stack, "--prefix": args.prefix,
                  "--rename": renames or None}
  if name != "scanned":
    for flag, value in scanned_only.items():
      if value is not None:
        raise CliError(f"{flag} goes with --rules scanned, not --rules {name}")
  if name == "gpt2":
    if args.fan_in_fan_out:
      raise CliError("--fan-in-fan-out: --rules gpt2 already knows GPT-2's Conv1D modules")
    return jlora.PeftRules.gpt2()
  if name == "scanned":
    return jlora.PeftRules.scanned(
        stack=args.stack or "params/layers", prefix=args.prefix or "model.layers",
        renames=renames, fan_in_fan_out=bool(args.fan_in_fan_out))
  return jlora.PeftRules.generic(fan_in_fan_out=bool(args.fan_in_fan_out))


def _parse_layouts(items: Sequence[str] | None) -> list[tuple[re.Pattern, Layout]]:
  out = []
  for item in items or ():
    regex, sep, axes = item.rpartition("=")
    parts = axes.split(":")
    try:
      if not sep or not regex or len(parts) not in (2, 3):
        raise ValueError
      nums = [tuple(int(a) for a in part.split(",") if a.strip()) for part in parts]
      layout = Layout(*nums)
      out.append((re.compile(regex), layout))
    except (ValueError, LoraError, re.error) as e:
      detail = f": {e}" if str(e) else ""
      raise CliError(f"--layout expects REGEX=IN:OUT[:STACK] with comma-separated axes "
                     f"(e.g. 'params/layers/out/kernel=1,2:3:0'), got {item!r}{detail}"
                     ) from None
  return out


def _n_fields(template: str) -> int:
  fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  return len(fields)


def _peft_layouts(folder: PathLike, params: Mapping[str, Any], rules,
                  overrides: list[tuple[re.Pattern, Layout]]) -> dict[str, Layout]:
  """Layouts of the weights a PEFT folder adapts, from the tensors' shapes.

  PyTorch flattens a multi-axis kernel to ``(out, in)``; the stack axes
  (one per ``{layer}`` field of the module name) lead, as ``nn.scan`` puts
  them, and the in axes come before the out axes. ``lora_A``'s width says
  where in ends; a shape that allows two splits needs ``--layout``.
  """
  from safetensors import safe_open
  weights = pathlib.Path(folder) / _PEFT_WEIGHTS
  fan_ins: dict[str, int] = {}
  try:
    with safe_open(os.fspath(weights), "numpy") as f:
      for key in f.keys():
        m = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_A\.weight", key)
        if m:
          shape = f.get_slice(key).get_shape()
          if len(shape) == 2:
            fan_ins[m.group(1)] = int(shape[1])
  except Exception:  # load_peft reports an unreadable file with its own message
    return {}
  layouts: dict[str, Layout] = {}
  for path, leaf in params.items():
    if leaf is None:
      continue
    chosen = next((layout for regex, layout in overrides if regex.fullmatch(path)), None)
    if chosen is not None:
      layouts[path] = chosen
      continue
    if path.rpartition("/")[2] not in rules.kernel_leaves:
      continue
    template = rules(path)
    if not template:
      continue
    n = _n_fields(template)
    ndim = len(leaf.shape)
    module = template.format(*([0] * n))
    if module not in fan_ins or ndim - n < 2 or (n == 0 and ndim == 2):
      continue
    shape = tuple(leaf.shape)
    splits = [k for k in range(1, ndim - n) if math.prod(shape[n:n + k]) == fan_ins[module]]
    if len(splits) != 1:
      raise CliError(
          f"'{path}' {shape}: cannot tell its layout from the adapter (lora_A of "
          f"'{module}' has {fan_ins[module]} inputs; {n} leading stack axes); pass "
          f"--layout '{re.escape(path)}=IN:OUT[:STACK]'")
    k = splits[0]
    layouts[path] = Layout(tuple(range(n, n + k)), tuple(range(n + k, ndim)),
                           tuple(range(n)))
  return layouts


def _rules_hint(e: Exception, args: argparse.Namespace) -> CliError:
  """A name-mapping error, with the options that set the mapping."""
  return CliError(f"{_one_line(e)} [names mapped by --rules {args.rules}; see "
                  f"--stack/--prefix/--rename/--layout in 'jlora {args.command} --help']")


def _load_peft(folder: PathLike, base: collections.OrderedDict, args: argparse.Namespace):
  import jlora
  rules = _rules(args)
  layouts = _peft_layouts(folder, base, rules, _parse_layouts(args.layout))
  try:
    return jlora.load_peft(folder, base, rules, layouts=layouts)
  except jlora.LoraPeftError as e:
    if "rules" in str(e) or "stack" in str(e):
      raise _rules_hint(e, args) from e
    raise


# -- orbax adapters -----------------------------------------------------------------


def _adapter_meta(path: PathLike) -> dict[str, Any]:
  import jlora
  return jlora.adapter_metadata(path)


def _extras(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  return {e["path"]: e["arrays"]["value"] for e in meta["entries"] if e["kind"] == "extra"}


def _fingerprint_base(meta: Mapping[str, Any]) -> collections.OrderedDict:
  """An abstract base rebuilt from an adapter's fingerprint (no file needed)."""
  base = collections.OrderedDict()
  for p, shape, dtype in meta["base"]["params"]:
    base[p] = None if shape is None else jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  for p, info in _extras(meta).items():
    base[p] = jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]))
  return base


def _order_for_adapter(base: collections.OrderedDict, meta: Mapping[str, Any]
                       ) -> collections.OrderedDict:
  """``base`` in the leaf order of the tree the adapter was saved with.

  A file does not keep a tree's structure, only its paths; the adapter's
  fingerprint lists them in the original order, so the check against it
  compares paths, shapes and dtypes, not an accident of ordering.
  """
  out = collections.OrderedDict()
  for p, shape, _ in meta["base"]["params"]:
    if p in base:
      out[p] = base[p]
    elif shape is None:
      out[p] = None
  for p in _extras(meta):
    if p in base:
      out[p] = base[p]
  for p, leaf in base.items():  # not in the fingerprint: load_adapter names them
    if p not in out:
      out[p] = leaf
  return out


def _load_jlora(path: PathLike, base: collections.OrderedDict | None):
  """(trainable, spec, meta, base used): checked against ``base`` if given."""
  import jlora
  meta = _adapter_meta(path)
  tree = _fingerprint_base(meta) if base is None else _order_for_adapter(base, meta)
  trainable, spec = jlora.load_adapter(path, base=tree)
  return trainable, spec, meta, tree


# -- inspect -------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
  if isinstance(value, Layout):
    return {"in_axes": list(value.in_axes), "out_axes": list(value.out_axes),
            "stack_axes": list(value.stack_axes)}
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.dtype, type)):
    try:
      return jnp.dtype(value).name
    except TypeError:
      pass
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if callable(value):
    return f"<callable {getattr(value, '__qualname__', repr(value))}>"
  return repr(value)


def _spec_dict(spec: LoraSpec | None) -> dict[str, Any] | None:
  if spec is None:
    return None
  return {"rank": spec.rank, "alpha": spec.alpha, "use_rslora": spec.use_rslora,
          "targets": _jsonable(spec.targets), "exclude": _jsonable(spec.exclude),
          "rank_pattern": _jsonable(dict(spec.rank_pattern)),
          "alpha_pattern": _jsonable(dict(spec.alpha_pattern)),
          "dropout": spec.dropout, "init": spec.init, "dtype": _jsonable(spec.dtype),
          "extra_trainable": _jsonable(spec.extra_trainable),
          "layouts": _jsonable(dict(spec.layouts))}


def _nbytes(shape: Sequence[int], dtype: Any) -> int:
  return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def _inspect_jlora(path: PathLike) -> dict[str, Any]:
  trainable, spec, meta, _ = _load_jlora(path, None)  # verifies every checksum
  pairs = dict(flatten_with_paths(trainable, is_leaf=lambda x: isinstance(x, LoraParam))[0])
  base_rows = {p: (shape, dtype) for p, shape, dtype in meta["base"]["params"]}
  targets, extras, count, nbytes = [], [], 0, 0
  for e in meta["entries"]:
    arrays = {k: v for k, v in e["arrays"].items() if v is not None}
    for info in arrays.values():
      count += int(math.prod(info["shape"]))
      nbytes += _nbytes(info["shape"], info["dtype"])
    if e["kind"] == "lora":
      lp = pairs[e["path"]]
      shape, dtype = base_rows[e["path"]]
      targets.append({"path": e["path"], "rank": int(lp.rank), "scale": float(lp.scale),
                      "shape": list(shape), "dtype": dtype,
                      "a_shape": arrays["a"]["shape"], "b_shape": arrays["b"]["shape"],
                      "factor_dtype": arrays["a"]["dtype"], "layout": _jsonable(lp.layout),
                      "dropout": float(lp.dropout)})
    else:
      extras.append({"path": e["path"], "shape": arrays["value"]["shape"],
                     "dtype": arrays["value"]["dtype"]})
  # The fingerprint leaves out the weights the adapter trains in full; the
  # base still has them.
  shapes = [s for _, s, _ in meta["base"]["params"] if s is not None]
  shapes += [e["shape"] for e in extras]
  base = {"sha256": meta["base"]["sha256"], "params": len(shapes),
          "elements": int(sum(math.prod(s) for s in shapes))}
  notes = list((meta.get("spec") or {}).get("notes") or [])
  return {"path": str(pathlib.Path(path).absolute()), "format": "jlora",
          "format_detail": f"jlora orbax adapter ({meta['format']} v{meta['version']}, "
                           f"written by jlora {meta.get('jlora_version', '?')})",
          "spec": _spec_dict(spec), "spec_notes": notes, "targets": targets,
          "extra_trainable": extras, "trainable_params": count, "bytes": nbytes,
          "checksums": "ok", "base": base}


def _peft_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  # PEFT's get_pattern_key: the first key matching a '.'-aligned suffix.
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _inspect_peft(path: PathLike) -> dict[str, Any]:
  from safetensors import safe_open
  folder = pathlib.Path(path).absolute()
  cfg_file, weights = folder / _PEFT_CONFIG, folder / _PEFT_WEIGHTS
  try:
    config = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise CliError(f"'{cfg_file}' is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise CliError(f"'{cfg_file}': expected a JSON object")
  if not weights.is_file():
    extra = " (only adapter_model.bin, a pickle, which jlora never reads)" if (
        folder / "adapter_model.bin").is_file() else ""
    raise CliError(f"'{folder}' has no {_PEFT_WEIGHTS}{extra}")
  shapes: dict[str, tuple[list[int], str]] = {}
  try:
    with safe_open(os.fspath(weights), "numpy") as f:
      for key in f.keys():
        s = f.get_slice(key)
        shapes[key] = ([int(d) for d in s.get_shape()], s.get_dtype())
  except Exception as e:  # safetensors raises its own (non-OSError) types
    raise CliError(f"'{weights}' is not a readable safetensors file "
                   f"({' '.join(str(e).split())})") from e
  st_dtypes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
  r, alpha = config.get("r"), config.get("lora_alpha")
  rslora = bool(config.get("use_rslora", False))
  modules: dict[str, dict[str, Any]] = {}
  full = []
  count = nbytes = 0
  for key, (shape, dt) in sorted(shapes.items()):
    dtype = st_dtypes.get(dt, dt.lower())
    count += int(math.prod(shape))
    try:
      nbytes += _nbytes(shape, dtype)
    except TypeError:
      pass
    rest = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
    if m:
      modules.setdefault(m.group(1), {})[m.group(2)] = (shape, dtype)
    else:
      full.append({"key": key, "shape": shape, "dtype": dtype})
  targets = []
  for module, parts in modules.items():
    a, b = parts.get("A"), parts.get("B")
    rank = a[0][0] if a else (b[0][1] if b else None)
    mod_alpha = _peft_value(config.get("alpha_pattern"), module, alpha)
    mod_r = _peft_value(config.get("rank_pattern"), module, r)
    scale = None
    if isinstance(mod_alpha, (int, float)) and rank:
      scale = float(mod_alpha) / (math.sqrt(rank) if rslora else rank)
    targets.append({"module": module, "rank": rank, "config_rank": mod_r, "alpha": mod_alpha,
                    "scale": scale, "in": a[0][1] if a else None,
                    "out": b[0][0] if b else None, "a_shape": a[0] if a else None,
                    "b_shape": b[0] if b else None, "factor_dtype": (a or b)[1]})
  spec = {"rank": r, "alpha": alpha, "use_rslora": rslora,
          "targets": config.get("target_modules"),
          "exclude": config.get("exclude_modules"),
          "rank_pattern": config.get("rank_pattern") or {},
          "alpha_pattern": config.get("alpha_pattern") or {},
          "dropout": config.get("lora_dropout"),
          "modules_to_save": config.get("modules_to_save"),
          "fan_in_fan_out": config.get("fan_in_fan_out"),
          "use_dora": bool(config.get("use_dora", False)),
          "peft_type": config.get("peft_type"),
          "base_model_name_or_path": config.get("base_model_name_or_path")}
  return {"path": str(folder), "format": "peft",
          "format_detail": "PEFT LoRA adapter folder (adapter_config.json + "
                           "adapter_model.safetensors)",
          "spec": spec, "targets": targets, "modules_to_save": full,
          "trainable_params": count, "bytes": nbytes, "base": None}


def _inspect_params(path: PathLike) -> dict[str, Any]:
  flat = _read_params(path, "params checkpoint")
  dtypes = collections.Counter(jnp.dtype(x.dtype).name for x in flat.values())
  return {"path": str(pathlib.Path(path).absolute()), "format": "params",
          "format_detail": "parameters (a base or a merged model): " +
                           ("safetensors file" if pathlib.Path(path).is_file()
                            else "orbax checkpoint"),
          "params": len(flat), "elements": int(sum(x.size for x in flat.values())),
          "bytes": int(sum(x.size * x.dtype.itemsize for x in flat.values())),
          "dtypes": dict(dtypes),
          "tensors": [{"path": p, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
                      for p, x in flat.items()]}


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape_str(shape: Any) -> str:
  return "-" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _layout_str(layout: Mapping[str, Any]) -> str:
  s = f"in {tuple(layout['in_axes'])} out {tuple(layout['out_axes'])}"
  if layout["stack_axes"]:
    s += f" stack {tuple(layout['stack_axes'])}"
  return s


def _format_inspect(info: dict[str, Any]) -> str:
  lines = [f"{info['path']}", f"format: {info['format_detail']}"]
  if info["format"] == "params":
    dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
    lines.append(f"parameters: {info['params']} tensors, {info['elements']:,} elements, "
                 f"{info['bytes']:,} bytes ({dtypes})")
    rows = [["path", "shape", "dtype"]] + [[t["path"], _shape_str(t["shape"]), t["dtype"]]
                                           for t in info["tensors"]]
    return "\n".join(lines + _table(rows))
  spec = info["spec"]
  if spec is None:
    lines.append("spec: not stored")
  else:
    lines.append(f"spec: rank {spec['rank']}, alpha {spec['alpha']}, rslora "
                 f"{'yes' if spec['use_rslora'] else 'no'}, dropout {spec['dropout']}")
    names = ["targets", "exclude", "rank_pattern", "alpha_pattern"] + (
        ["extra_trainable", "layouts"] if info["format"] == "jlora" else
        ["modules_to_save", "fan_in_fan_out", "base_model_name_or_path"])
    for name in names:
      if spec.get(name) not in (None, {}, []):
        lines.append(f"  {name}: {json.dumps(spec[name])}")
    for note in info.get("spec_notes") or ():
      lines.append(f"  note: {note}")
  if info["format"] == "jlora":
    rows = [["path", "rank", "scale", "W0 shape", "dtype", "A", "B", "layout"]]
    rows += [[t["path"], str(t["rank"]), f"{t['scale']:g}", _shape_str(t["shape"]),
              t["dtype"], _shape_str(t["a_shape"]), _shape_str(t["b_shape"]),
              _layout_str(t["layout"])] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])}):")
    lines += _table(rows)
    if info["extra_trainable"]:
      lines.append(f"extra trainable ({len(info['extra_trainable'])}):")
      lines += _table([[e["path"], _shape_str(e["shape"]), e["dtype"]]
                       for e in info["extra_trainable"]])
  else:
    rows = [["module", "rank", "alpha", "scale", "in", "out", "dtype"]]
    rows += [[t["module"], str(t["rank"]), f"{t['alpha']}",
              "-" if t["scale"] is None else f"{t['scale']:g}", str(t["in"]), str(t["out"]),
              t["factor_dtype"]] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])} modules):")
    lines += _table(rows)
    if info["modules_to_save"]:
      lines.append(f"trained in full ({len(info['modules_to_save'])} tensors):")
      lines += _table([[t["key"], _shape_str(t["shape"]), t["dtype"]]
                       for t in info["modules_to_save"]])
  lines.append(f"trainable: {info['trainable_params']:,} parameters, {info['bytes']:,} bytes")
  if info["format"] == "jlora":
    b = info["base"]
    lines.append(f"checksums: {info['checksums']}")
    lines.append(f"base: {b['params']} parameters, {b['elements']:,} elements, "
                 f"fingerprint sha256 {b['sha256']}")
  return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
  kind = _kind(args.path)
  info = {"jlora": _inspect_jlora, "peft": _inspect_peft,
          "params": _inspect_params}[kind](args.path)
  print(json.dumps(info, indent=2) if args.json else _format_inspect(info))
  return 0


# -- merge ---------------------------------------------------------------------------


def _check_out(path: PathLike, overwrite: bool) -> pathlib.Path:
  p = pathlib.Path(path).absolute()
  if p.exists() and not overwrite:
    raise CliError(f"'{p}' already exists; pass --overwrite to replace it")
  return p


def _merge_trees(frozen: Any, trainable: Any, quiet: bool, check_finite: bool
                 ) -> collections.OrderedDict:
  """``jlora.merge`` one parameter at a time, under a progress bar."""
  import jlora
  from tqdm import tqdm
  is_leaf = lambda x: isinstance(x, LoraParam)  # noqa: E731
  f_pairs = flatten_with_paths(frozen)[0]
  t_pairs = dict(flatten_with_paths(trainable, is_leaf=is_leaf)[0])
  out = collections.OrderedDict()
  # disable=None: a bar on a terminal only, nothing in logs or pipes.
  for path, w0 in tqdm(f_pairs, desc="merging", unit="param", disable=True if quiet else None,
                       file=sys.stderr, leave=False):
    t = t_pairs.get(path)
    if isinstance(t, LoraParam):
      out[path] = jlora.merge({path: w0}, {path: t}, check_finite=check_finite)[path]
    elif t is not None:
      out[path] = t  # trained in full
    else:
      out[path] = w0
  return out


def _cmd_merge(args: argparse.Namespace) -> int:
  import jlora
  fmt = args.format or ("safetensors" if _is_safetensors(args.out) else "orbax")
  if fmt == "safetensors" and not _is_safetensors(args.out):
    raise CliError(f"--format safetensors: --out must end in .safetensors, got '{args.out}'")
  if fmt == "orbax" and _is_safetensors(args.out):
    raise CliError(f"--format orbax: --out '{args.out}' ends in .safetensors; name the "
                   f"checkpoint directory otherwise")
  out = _check_out(args.out, args.overwrite)
  kind = _adapter_kind(args.adapter)
  if kind == "jlora" and (args.rules != "generic" or args.layout):
    raise CliError("--rules/--layout are for PEFT folders; a jlora adapter stores its "
                   "names and layouts")
  base = _read_params(args.base)
  if kind == "jlora":
    trainable, _, _, ordered = _load_jlora(args.adapter, base)
    frozen = jlora.frozen_like(ordered, trainable)
  else:
    adapter = _load_peft(args.adapter, base, args)
    frozen, trainable = adapter.frozen, adapter.trainable
  merged = _merge_trees(frozen, trainable, args.quiet, args.check_finite)
  merged = collections.OrderedDict((p, merged[p]) for p in base)  # the base's order
  written = save_params(out, merged, overwrite=args.overwrite)
  n_adapted = sum(isinstance(x, LoraParam) for x in jax.tree.leaves(
      trainable, is_leaf=lambda x: isinstance(x, LoraParam)))
  print(f"wrote {written} ({fmt}): {len(merged)} parameters, {n_adapted} merged with the "
        f"adapter")
  return 0


# -- convert -------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
  import jlora
  kind = _adapter_kind(args.src)
  want = {"peft": "peft", "orbax": "jlora"}[args.to]
  if kind == want:
    what = "PEFT folder" if kind == "peft" else "jlora orbax adapter"
    raise CliError(f"'{args.src}' is already a {what}; nothing to convert")
  dst = pathlib.Path(args.dst).absolute()
  if args.to == "peft":
    if args.layout:
      raise CliError("--layout is for reading PEFT folders; a jlora adapter stores its layouts")
    if dst.exists() and (dst.is_file() or any(dst.iterdir())) and not args.overwrite:
      raise CliError(f"'{dst}' already exists and is not empty; pass --overwrite to replace "
                     f"its files")
    base = _read_params(args.base) if args.base else None
    trainable, spec, _, _ = _load_jlora(args.src, base)
    try:
      config = jlora.save_peft(dst, trainable, _rules(args), spec=spec,
                               base_model_name_or_path=args.base_model_name)
    except jlora.LoraPeftError as e:
      raise _rules_hint(e, args) from e
    print(f"wrote {dst} (PEFT): r {config['r']}, lora_alpha {config['lora_alpha']}, "
          f"target_modules {config['target_modules']}")
    return 0
  if args.base is None:
    raise CliError("--to orbax needs --base BASE: a jlora adapter records the base's "
                   "parameters (paths, shapes, dtypes), and PEFT's layouts come from W0's shapes")
  if args.base_model_name is not None:
    raise CliError("--base-model-name is for --to peft (adapter_config.json)")
  _check_out(dst, args.overwrite)
  base = _read_params(args.base)
  adapter = _load_peft(args.src, base, args)
  jlora.save_adapter(dst, adapter.trainable, adapter.spec, base=adapter.frozen,
                     overwrite=args.overwrite)
  n = sum(isinstance(x, LoraParam) for x in jax.tree.leaves(
      adapter.trainable, is_leaf=lambda x: isinstance(x, LoraParam)))
  print(f"wrote {dst} (jlora orbax adapter): {n} adapted parameters")
  return 0


# -- the parser ----------------------------------------------------------------------


class _ArgError(Exception):
  """argparse's complaint, reported as one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse prints usage + message and exits; one line instead
    raise _ArgError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")
  rules = argparse.ArgumentParser(add_help=False)
  rules.add_argument("--rules", choices=["generic", "gpt2", "scanned"], default="generic",
                     help="how Flax parameter paths name PyTorch modules (PEFT): generic "
                          "('/' -> '.', leaf and a leading 'params' dropped), gpt2 "
                          "(Hugging Face GPT-2, Conv1D modules), scanned (an nn.scan stack, "
                          "one module per layer)")
  rules.add_argument("--stack", help="scanned: the stacked Flax path (default params/layers)")
  rules.add_argument("--prefix", help="scanned: the PyTorch layer list (default model.layers)")
  rules.add_argument("--rename", action="append", metavar="FLAX=TORCH",
                     help="scanned: a module inside the stack named otherwise in PyTorch "
                          "(e.g. query=self_attn.q_proj); repeatable")
  rules.add_argument("--fan-in-fan-out", action="store_true",
                     help="generic/scanned: the PyTorch modules store weights (in, out) "
                          "(Conv1D)")
  rules.add_argument("--layout", action="append", metavar="REGEX=IN:OUT[:STACK]",
                     help="reading a PEFT folder: the layout of the weights whose path "
                          "matches REGEX, axes comma-separated (e.g. "
                          "'params/layers/out/kernel=1,2:3:0'); by default inferred from "
                          "the tensors' shapes (stack axes first, then in, then out)")

  parser = _Parser(prog="jlora", description="Inspect, merge and convert LoRA adapters "
                   "(jlora orbax adapters and PEFT folders).")
  parser.add_argument("--debug", action="store_true", default=False,
                      help="show the full traceback of an error")
  from jlora import __version__
  parser.add_argument("--version", action="version", version=f"jlora {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  p = sub.add_parser("inspect", parents=[common], help="describe an adapter (or a base)",
                     description="Describe an adapter: its format, spec, targets with ranks "
                     "and shapes, trainable count, bytes and (jlora adapters) the base "
                     "fingerprint. Also reads a params checkpoint or .safetensors base.")
  p.add_argument("path", help="a jlora adapter directory, a PEFT folder, or a base")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.set_defaults(func=_cmd_inspect)

  p = sub.add_parser("merge", parents=[common, rules], help="merge an adapter into a base",
                     description="Write W0 + s B A for every adapted weight (float32 "
                     "accumulation, the base's dtypes) and the adapter's fully trained "
                     "weights: all the parameters of the merged model.")
  p.add_argument("--base", required=True, help="the base: an orbax params checkpoint "
                 "directory or a .safetensors file ('/'-joined keys); see jlora.save_params")
  p.add_argument("--adapter", required=True, help="a jlora adapter directory or a PEFT folder")
  p.add_argument("--out", required=True, help="the merged parameters: NAME.safetensors or "
                 "an orbax checkpoint directory")
  p.add_argument("--format", choices=["orbax", "safetensors"],
                 help="the output format (default: by --out's suffix)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--check-finite", action="store_true",
                 help="fail on a NaN or infinity in a merged weight")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=_cmd_merge)

  p = sub.add_parser("convert", parents=[common, rules],
                     help="convert between jlora orbax adapters and PEFT folders",
                     description="Convert a jlora orbax adapter to a PEFT folder (--to peft) "
                     "or a PEFT folder to a jlora orbax adapter (--to orbax, which needs "
                     "--base).")
  p.add_argument("src", help="the adapter to convert")
  p.add_argument("dst", help="the folder to write")
  p.add_argument("--to", required=True, choices=["peft", "orbax"], help="the output format")
  p.add_argument("--base", help="the base (needed for --to orbax; with --to peft, checked "
                 "against the adapter's fingerprint)")
  p.add_argument("--base-model-name", help="--to peft: base_model_name_or_path for "
                 "adapter_config.json")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  p.set_defaults(func=_cmd_convert)
  return parser


# -- main ----------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jlora`` command line; returns the exit status.

  Errors (a missing file, a folder that is no adapter, an adapter made for
  another base, bad options) print one line, ``jlora: error: ...``, on
  stderr and return a non-zero status; ``--debug`` shows the traceback.

  Example:
    >>> import jlora.cli
    >>> jlora.cli.main(["inspect", "/no/such/adapter"])
    1
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = _parser().parse_args(argv)
  except _ArgError as e:
    print(f"jlora: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help, --version
    return int(e.code or 0)
  debug = bool(getattr(args, "debug", False))
  loggers = [logging.getLogger(name) for name in ("absl", "jax", "orbax")]
  levels = [lg.level for lg in loggers]
  with warnings.catch_warnings():
    if not debug:
      # Orbax and JAX log warnings (missing sharding info, CPU fallback) that
      # say nothing about the user's files.
      warnings.simplefilter("ignore")
      for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
      return args.func(args)
    except BrokenPipeError:
      # stdout closed early (`jlora inspect ... | head`): nothing to report.
      try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      except (OSError, ValueError, AttributeError):
        pass
      return 1
    except (LoraError, OSError, ValueError) as e:
      if debug:
        raise
      print(f"jlora: error: {_one_line(e)}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("jlora: error: interrupted", file=sys.stderr)
      return 130
    except Exception as e:  # a bug: one line, the traceback with --debug
      if debug:
        raise
      print(f"jlora: error: unexpected {type(e).__name__}: {_one_line(e)} (run with "
            f"--debug for the traceback)", file=sys.stderr)
      return 1
    finally:
      for lg, level in zip(loggers, levels):
        lg.setLevel(level)


if __name__ == "__main__":
  sys.exit(main())
