"""Text for the terminal: what the formats' ``describe`` functions return,
as lines and tables, and an error as one line.

Nothing here reads a file; ``jlora inspect --json`` prints the same
dictionaries as they are.
"""

from __future__ import annotations

import json
from typing import Any, Mapping


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
  """Rows of cells as lines, each column as wide as its widest cell.

  Example:
    >>> print("\\n".join(_table([["path", "rank"], ["params/out/kernel", "4"]])))
      path               rank
      params/out/kernel  4
  """
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape_str(shape: Any) -> str:
  """``(2, 3)`` for a shape, ``-`` for none."""
  return "-" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _layout_str(layout: Mapping[str, Any]) -> str:
  """A described layout (``in_axes``, ``out_axes``, ``stack_axes``) in a few words."""
  s = f"in {tuple(layout['in_axes'])} out {tuple(layout['out_axes'])}"
  if layout["stack_axes"]:
    s += f" stack {tuple(layout['stack_axes'])}"
  return s


def _format_inspect(info: dict[str, Any]) -> str:
  """What ``jlora inspect`` prints for a ``describe`` result of any format."""
  lines = [f"{info['path']}", f"format: {info['format_detail']}"]
  if info["format"] == "peft-bank":
    for adapter in info["adapters"]:
      lines.append(f"adapter {adapter['name']!r}:")
      lines += ["  " + line for line in _format_inspect(adapter).splitlines()]
    return "\n".join(lines)
  if info["format"] in ("params", "bnb-4bit"):
    if info["format"] == "bnb-4bit":
      lines.append(f"on disk: {info['file_bytes']:,} bytes (with each weight's quant maps and "
                   f"quant state)")
    return "\n".join(lines + _format_params(info))
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
    rows = [["path", "kind", "rank", "scale", "W0 shape", "dtype", "A", "B", "layout"]]
    rows += [[t["path"], t.get("kind", "lora") + (f" ({t['residual']})" if t.get("residual")
                                                  else ""),
              str(t["rank"]), "-" if t["scale"] is None else f"{t['scale']:g}",
              _shape_str(t["shape"]), t["dtype"], _shape_str(t["a_shape"]),
              _shape_str(t["b_shape"]), _layout_str(t["layout"])] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])}):")
    lines += _table(rows)
    if info.get("adapters"):
      lines.append(f"adapters ({len(info['adapters'])}, a bank):")
      lines += _table([[repr(a["name"]), f"{a['targets']} weights",
                        "rank " + "/".join(str(r) for r in a["ranks"]),
                        "scale " + "/".join(f"{x:g}" for x in a["scales"])]
                       for a in info["adapters"]])
    if info["extra_trainable"]:
      lines.append(f"extra trainable ({len(info['extra_trainable'])}):")
      lines += _table([[e["path"], _shape_str(e["shape"]), e["dtype"]]
                       for e in info["extra_trainable"]])
  else:
    rows = [["module", "kind", "rank", "alpha", "scale", "in", "out", "dtype"]]
    rows += [[t["module"], t.get("kind", "linear") + ("+dora" if "magnitude_shape" in t else ""),
              str(t["rank"]), f"{t['alpha']}",
              "-" if t["scale"] is None else f"{t['scale']:g}", str(t["in"]), str(t["out"]),
              t["factor_dtype"]] for t in info["targets"]]
    lines.append(f"targets ({len(info['targets'])} modules):")
    lines += _table(rows)
    if info["modules_to_save"]:
      lines.append(f"trained in full ({len(info['modules_to_save'])} tensors):")
      lines += _table([[t["key"], _shape_str(t["shape"]), t["dtype"]]
                       for t in info["modules_to_save"]])
  lines.append(f"trainable: {info['trainable_params']:,} parameters, {info['bytes']:,} bytes")
  lines.append(f"checksums: {info['checksums']}")
  if info["format"] == "jlora":
    b = info["base"]
    lines.append(f"base: {b['params']} parameters, {b['elements']:,} elements, "
                 f"fingerprint sha256 {b['sha256']}")
  return "\n".join(lines)


def _format_params(info: dict[str, Any]) -> list[str]:
  """The lines of a base (or a bitsandbytes checkpoint): totals, then a table."""
  dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
  lines = [f"parameters: {info['params']} tensors, {info['elements']:,} elements, "
           f"{info['bytes']:,} bytes ({dtypes})"]
  q, d = info["quantized"], info["dense"]
  if q:
    lines.append(f"quantized: {q['tensors']} tensors (NF4), {q['elements']:,} elements, "
                 f"{q['bytes']:,} bytes, {q['bits_per_param']:.3f} bits per parameter")
    lines.append(f"dense: {d['tensors']} tensors, {d['elements']:,} elements, {d['bytes']:,} "
                 f"bytes; {info['bits_per_param']:.3f} bits per parameter in all, "
                 f"{info['dequantized_bytes']:,} bytes dequantized")
  header = ["path", "shape", "dtype"] + (["stored"] if q else [])
  rows = [header]
  for t in info["tensors"]:
    row = [t["path"], _shape_str(t["shape"]), t["dtype"]]
    if q:
      qt = t.get("quant")
      row.append("dense" if qt is None else
                 f"nf4, block {qt['block_size']}{', double quant' if qt['double_quant'] else ''}"
                 f", {qt['bits_per_param']:.3f} bits")
    rows.append(row)
  return lines + _table(rows)


def _one_line(e: BaseException) -> str:
  """An error's message on one line (its type's name when it has none).

  Example:
    >>> _one_line(ValueError("bad\\n  value")), _one_line(KeyboardInterrupt())
    ('bad value', 'KeyboardInterrupt')
  """
  return " ".join(str(e).split()) or type(e).__name__
