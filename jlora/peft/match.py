"""Matching a PEFT folder's modules to the parameters they adapt.

``Index`` applies the forward rule (``jlora.peft.Rules``) to every parameter
path, so a PyTorch module name (``model.layers.3.mlp.up_proj``) finds its
parameter and, for a stacked weight, its index in the stack.
``lora_modules`` gives each adapted weight its modules' tensors (``Found``),
checking each pair's shapes and rank against the config; the factors of
``target_parameters`` and of tied tables have their own rules
(``target_parameters``, ``check_tied``).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
from typing import Any, Mapping

import numpy as np

from jlora.errors import LoraPeftError
from jlora.peft import config as peft_config
from jlora.peft import kinds, names
from jlora.peft.rules import Rules


@dataclasses.dataclass
class Entry:
  """One parameter the rules name: its leaf, module template and what it is."""
  index: int            # position among the flattened leaves
  path: str
  leaf: Any
  template: str
  n_stack: int
  torch_name: str | None
  is_kernel: bool
  is_embedding: bool = False
  param_name: str = ""   # the PyTorch parameter name (for target_parameters)


class Index:
  """Parameter paths by PyTorch module name, from the forward rule."""

  def __init__(self, pairs, rules: Rules):
    self.entries: list[Entry] = []
    self.exact: dict[str, list[Entry]] = collections.defaultdict(list)
    self.stacked: list[tuple[re.Pattern, list[int], Entry]] = []
    for i, (path, leaf) in enumerate(pairs):
      template = rules(path)
      if template is None:
        continue
      leaf_name = path.rpartition("/")[2]
      e = Entry(i, path, leaf, template, names.n_stack(template),
                rules.leaf_names.get(leaf_name), leaf_name in rules.kernel_leaves,
                leaf_name in rules.embedding_leaves, rules.torch_param(path))
      self.entries.append(e)
      if e.n_stack:
        regex, positions = names.template_regex(template)
        self.stacked.append((regex, positions, e))
      else:
        self.exact[template].append(e)

  def find(self, module: str) -> list[tuple[Entry, tuple[int, ...]]]:
    out = [(e, ()) for e in self.exact.get(module, ())]
    for regex, positions, e in self.stacked:
      m = regex.fullmatch(module)
      if m:
        index = [0] * e.n_stack
        for pos, g in zip(positions, m.groups()):
          index[pos] = int(g)
        out.append((e, tuple(index)))
    return out

  def near(self, module: str) -> list[str]:
    known = list(self.exact) + [e.template for _, _, e in self.stacked]
    return difflib.get_close_matches(module, known, n=3, cutoff=0.0)


@dataclasses.dataclass
class Found:
  """One module's (one slice's) tensors in the file."""
  kind: str
  key_a: str
  lora_a: np.ndarray
  key_b: str
  lora_b: np.ndarray
  r: int
  alpha: Any
  magnitude: np.ndarray | None = None
  key_m: str | None = None
  transposed: bool = False


def halves(parts, name: str, emb: bool, weights: str):
  """A module's ``(key, tensor)`` for A and for B; each needs its partner."""
  keys = ("embA", "embB") if emb else ("A", "B")
  key_of = ((lambda h: names.embedding_key(name, h)) if emb
            else (lambda h: names.lora_key(name, h)))
  for half, other in ((keys[0], keys[1]), (keys[1], keys[0])):
    if half not in parts:
      raise LoraPeftError(f"'{weights}': '{parts[other][0]}' has no partner "
                          f"'{key_of(half[-1])}'")
  return parts[keys[0]], parts[keys[1]]


def check_pair(kind: str, key_a: str, lora_a, key_b: str, lora_b, weights: str) -> None:
  """lora_A and lora_B have the number of axes ``kind`` stores, and one rank."""
  ok = lora_b.ndim >= 2 and lora_b.shape[1] == lora_a.shape[0]
  if kind == kinds.CONV:
    ok = ok and lora_a.ndim == lora_b.ndim and all(d == 1 for d in lora_b.shape[2:])
    want = "(r, in, *window) and (out, r, 1, ...)"
  else:
    ok = ok and lora_a.ndim == 2 and lora_b.ndim == 2
    want = "(r, in) and (out, r)" if kind != kinds.EMBEDDING else "(r, vocab) and (d, r)"
  if not ok:
    raise LoraPeftError(f"'{weights}': '{key_a}' {lora_a.shape} and '{key_b}' "
                        f"{lora_b.shape} are not {want}")


def lora_modules(lora, index: Index, config, rules: Rules, weights: str
                 ) -> dict[int, tuple[Entry, dict[tuple[int, ...], Found]]]:
  """Each file module -> the weight it adapts (leaf index) and stack index."""
  found: dict[int, tuple[Entry, dict[tuple[int, ...], Found]]] = {}
  by_param_module: dict[str, dict[int, tuple[str, Any]]] = collections.defaultdict(dict)
  tied: dict[str, Any] = {}
  embeddings: dict[str, Any] = {}
  use_dora = bool(config.get("use_dora"))

  def record(e: Entry, idx, kind: str, pattern_name: str, a_part, b_part, parts,
             transposed: bool = False) -> None:
    (key_a, lora_a), (key_b, lora_b) = a_part, b_part
    check_pair(kind, key_a, lora_a, key_b, lora_b, weights)
    slice_shape = tuple(e.leaf.shape)[e.n_stack:]
    r = kinds.rank_of(kind, lora_a, slice_shape) if kind == kinds.PARAMETER else lora_a.shape[0]
    want_r = peft_config.pattern_value(config.get("rank_pattern"), pattern_name, config["r"])
    if r != want_r:
      raise LoraPeftError(f"'{weights}': '{key_a}' has rank {r} but adapter_config.json "
                          f"gives module '{pattern_name}' rank {want_r}")
    alpha = peft_config.pattern_value(config.get("alpha_pattern"), pattern_name,
                                      config["lora_alpha"])
    m_part = parts.get("m")
    if use_dora and kind != kinds.PARAMETER and m_part is None:
      raise LoraPeftError(f"'{weights}': no '{names.magnitude_key(pattern_name)}' for "
                          f"module '{pattern_name}', although use_dora is true")
    if m_part is not None and kind == kinds.PARAMETER:
      raise LoraPeftError(f"'{weights}': '{m_part[0]}' is a DoRA magnitude on a "
                          f"target_parameters weight, which PEFT does not have")
    f = Found(kind, key_a, lora_a, key_b, lora_b, r, alpha,
              None if m_part is None else m_part[1], None if m_part is None else m_part[0],
              transposed)
    found.setdefault(e.index, (e, {}))[1][idx] = f

  for name, parts in lora.items():
    base, depth = names.unnest(name)
    emb = "embA" in parts or "embB" in parts
    if emb and ("A" in parts or "B" in parts):
      raise LoraPeftError(f"'{weights}': module '{name}' has both lora_A/lora_B and "
                          f"lora_embedding_A/B tensors")
    if not emb and "A" not in parts and "B" not in parts:
      raise LoraPeftError(f"'{weights}': '{parts['m'][0]}' has no lora_A/lora_B beside it")
    a_part, b_part = halves(parts, name, emb, weights)
    key_a, lora_a = a_part
    if emb:
      hits = [(e, i) for e, i in index.find(name) if e.is_embedding] if not depth else []
      kind = kinds.EMBEDDING
    else:
      hits = [(e, i) for e, i in index.find(name) if e.is_kernel] if not depth else []
      if not hits and config.get("target_parameters"):
        by_param_module[base][depth] = (name, parts)
        continue
      if not hits and not depth and any(name in rules.tied_to(m) for m in rules.tied):
        tied[name] = parts
        continue
      kind = kinds.CONV if lora_a.ndim > 2 else kinds.LINEAR
    if not hits:
      hint = ("; the folder ties modules to its embedding (ensure_weight_tying): if the "
              "model's output head is its embedding table, say so with Rules(tied=...) "
              "(Rules.llama(tie_word_embeddings=True))" if config.get("ensure_weight_tying")
              else "")
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for PyTorch module '{name}', which no "
          f"parameter maps to under these rules (nearest module names: "
          f"{index.near(name)}){hint}")
    if len(hits) > 1:
      raise LoraPeftError(f"'{weights}': module '{name}' maps to several parameters: "
                          f"{[e.path for e, _ in hits]}")
    e, idx = hits[0]
    if e.leaf is None:
      raise LoraPeftError(f"'{e.path}' (PyTorch module '{name}') is None in params; "
                          f"pass the base parameters")
    if peft_config.targets(config, name) is False:
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for module '{name}', which target_modules "
          f"{config.get('target_modules')!r} does not select; PEFT would ignore it")
    record(e, idx, kind, name, a_part, b_part, parts)
    if emb:
      embeddings[name] = (e, parts)

  for base, depths in by_param_module.items():
    target_parameters(base, depths, index, config, rules, weights, record)
  check_tied(embeddings, tied, config, rules, weights)
  return found


def target_parameters(base: str, depths: Mapping[int, tuple[str, Any]], index: Index,
                      config, rules: Rules, weights: str, record) -> None:
  """The factors of the parameters of PyTorch module ``base`` that
  target_parameters adapts: PEFT nests one wrapper per parameter, in the
  order the module registers them (the first innermost, named
  ``<module>.base_layer...``)."""
  cands = [(e, i) for e, i in index.find(base)
           if e.leaf is not None and not e.is_kernel and not e.is_embedding
           and peft_config.targets_parameter(config, f"{base}.{e.param_name}")]
  name0, parts0 = depths[min(depths)]
  if not cands:
    raise LoraPeftError(
        f"'{weights}': key '{halves(parts0, name0, False, weights)[0][0]}' is for module "
        f"'{base}', but no parameter of it that target_parameters "
        f"{config.get('target_parameters')!r} selects maps to a parameter under these rules "
        f"(nearest module names: {index.near(base)})")
  if sorted(depths) != list(range(len(cands))):
    raise LoraPeftError(
        f"'{weights}': module '{base}' has {len(depths)} adapted parameter wrapper(s) in the "
        f"file but target_parameters selects {len(cands)} of its parameters "
        f"({[e.param_name for e, _ in cands]})")
  k = len(cands)
  order = None
  if k == 1:
    order = cands
  elif all(e.param_name in rules.parameter_order for e, _ in cands):
    order = sorted(cands, key=lambda c: rules.parameter_order.index(c[0].param_name))
  assignment: dict[int, tuple[Entry, Any]] = {}
  if order is not None:
    assignment = {k - 1 - pos: c for pos, c in enumerate(order)}
  else:    # the shapes may tell which wrapper is which parameter
    for depth, (name, parts) in depths.items():
      (_, lora_a), (_, lora_b) = halves(parts, name, False, weights)
      fits = []
      for e, i in cands:
        pname = f"{base}.{e.param_name}"
        shape = tuple(e.leaf.shape)[e.n_stack:]
        r = peft_config.pattern_value(config.get("rank_pattern"), pname, config["r"])
        lay = kinds.default_layout(kinds.PARAMETER, len(shape), 0, rules.is_transposed(pname))
        if kinds.torch_shapes(kinds.PARAMETER, shape, lay, r, rules.is_transposed(pname)) == (
            tuple(lora_a.shape), tuple(lora_b.shape)):
          fits.append((e, i))
      if len(fits) != 1:
        raise LoraPeftError(
            f"'{weights}': cannot tell which of the parameters "
            f"{[e.param_name for e, _ in cands]} of module '{base}' the factors of '{name}' "
            f"adapt (PEFT names them by the order the module registers them); pass "
            f"Rules(parameter_order=[...]) in the order of the module's __init__")
      assignment[depth] = fits[0]
    if len({id(e) for e, _ in assignment.values()}) != k:
      raise LoraPeftError(f"'{weights}': the factors of module '{base}' do not fit its "
                          f"parameters one to one; pass Rules(parameter_order=[...])")
  for depth, (e, idx) in assignment.items():
    name, parts = depths[depth]
    pname = f"{base}.{e.param_name}"
    a_part, b_part = halves(parts, name, False, weights)
    record(e, idx, kinds.PARAMETER, pname, a_part, b_part, parts,
           transposed=rules.is_transposed(pname))


def check_tied(embeddings, tied, config, rules: Rules, weights: str) -> None:
  """A tied table: jlora adapts it in every use; the file must adapt the tied
  modules alike (PEFT's ensure_weight_tying), with the same factors."""
  for name, (e, parts) in embeddings.items():
    others = rules.tied_to(name)
    if not others:
      continue
    if not config.get("ensure_weight_tying") or name.rpartition(".")[2] != "embed_tokens":
      raise LoraPeftError(
          f"'{weights}': the table of '{name}' is tied to {list(others)}, and this folder "
          f"adapts its lookup only (PEFT's ensure_weight_tying is "
          f"{'off' if not config.get('ensure_weight_tying') else 'only for embed_tokens'}); "
          f"jlora adapts a tied table in every use, so it would compute another model")
    if "m" in parts:
      raise LoraPeftError(f"'{weights}': DoRA on the tied table of '{name}' (PEFT keeps a "
                          f"magnitude per dimension there and one per token on "
                          f"{list(others)}), which one table cannot hold")
  for name, parts in tied.items():
    owner = next(m for m in rules.tied if name in rules.tied_to(m))
    if owner not in embeddings:
      raise LoraPeftError(f"'{weights}': module '{name}' is adapted, but it is tied to "
                          f"'{owner}', whose table the folder leaves alone")
    (_, lora_a), (_, lora_b) = halves(parts, name, False, weights)
    emb_parts = embeddings[owner][1]
    same = (lora_a.shape == emb_parts["embB"][1].T.shape
            and np.array_equal(lora_a, emb_parts["embB"][1].T)
            and lora_b.shape == emb_parts["embA"][1].T.shape
            and np.array_equal(lora_b, emb_parts["embA"][1].T))
    if not same or "m" in parts:
      raise LoraPeftError(f"'{weights}': the factors of '{name}', which is tied to "
                          f"'{owner}', are not that embedding's (transposed)")
