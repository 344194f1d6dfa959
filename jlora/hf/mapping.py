"""Which parameter each entry of a Hugging Face checkpoint becomes: ``jlora.hf.Mapping``.

A ``Mapping`` holds a table in google-tunix's own format (``tunix/models/
<family>/params.py``, ``_get_key_and_transform_mapping(cfg)``): a regex that
matches a PyTorch key, the parameter path it becomes (with the regex's
groups), and ``(permute, reshape)`` applied to the PyTorch tensor. Tunix's
targets may be intermediate names that a preprocessing step of its loader
stacks into one parameter (Gemma 3's ``q``/``k``/``v`` into ``kv_einsum``,
Qwen 3 MoE's experts): ``stacks`` says the same thing per tensor, so that no
step needs the whole model in memory. Targets under ``unused.`` are read by
no one and skipped.

For Tunix's Llama 3, Qwen 3 (and Qwen 3 MoE) and Gemma 3, ``tunix_mapping``
calls Tunix's own function with the model's config at run time: one table,
Tunix's, and no second copy here. What Tunix's Gemma 3 preprocessing and
Qwen 3 MoE expert stacking do is restated in ``stacks`` (read from
``params_safetensors._make_preprocess_fn`` and ``params._stack_experts``).

An NF4 weight (from a ``*-bnb-4bit`` file, or quantized while loading) keeps
the bytes bitsandbytes stores for the PyTorch ``(out, in)`` weight, row-major.
``slice_layout`` follows the input and output axes through the transform, so
the parameter's ``jlora.Layout`` stores exactly those bytes (storage order
``(*out_axes, *in_axes)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any

from jlora.errors import LoraError, LoraFileError
from jlora.layout import Layout

@dataclasses.dataclass(frozen=True)
class Target:
  """Where one checkpoint entry goes."""
  key: str                                  # the PyTorch key
  path: str                                 # the parameter path, '/'-separated
  index: int | None                         # its slice of a stacked parameter, or None
  permute: tuple[int, ...] | None           # Tunix's transform of the PyTorch tensor
  reshape: tuple[int, ...] | None
  slice_permute: tuple[int, ...] | None     # then the stack's own transpose

  def shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the (slice of the) parameter made of a tensor of ``torch_shape``."""
    shape = tuple(torch_shape)
    if self.permute:
      shape = tuple(shape[a] for a in self.permute)
    if self.reshape:
      shape = tuple(self.reshape)
    if self.slice_permute:
      shape = tuple(shape[a] for a in self.slice_permute)
    return shape

  def linear(self, torch_shape: tuple[int, ...]) -> bool:
    """Whether the entry is the ``(out, in)`` weight of a linear layer (transposed)."""
    return len(torch_shape) == 2 and tuple(self.permute or ()) == (1, 0)


def apply(x: Any, target: Target) -> Any:
  """The PyTorch tensor ``x`` (NumPy) transformed as the target says."""
  if target.permute:
    x = x.transpose(target.permute)
  if target.reshape:
    x = x.reshape(target.reshape)
  if target.slice_permute:
    x = x.transpose(target.slice_permute)
  return x


def slice_layout(target: Target, torch_shape: tuple[int, int], where: str) -> Layout:
  """The ``Layout`` under which the (slice of the) parameter stores the PyTorch
  ``(out, in)`` weight row-major: its input axes are those the reshape makes
  of ``in``, its output axes those it makes of ``out``, in that order."""
  out_dim, in_dim = torch_shape
  shape = tuple(target.reshape) if target.reshape else (in_dim, out_dim)
  split = next((k for k in range(1, len(shape))
                if math.prod(shape[:k]) == in_dim and math.prod(shape[k:]) == out_dim), None)
  if not target.linear(torch_shape) or split is None:
    raise LoraFileError(f"{where}: '{target.key}' {tuple(torch_shape)} becomes '{target.path}' "
                        f"by a transform that does not keep a linear weight's input and output "
                        f"axes apart, so it cannot be stored in NF4")
  in_axes, out_axes = tuple(range(split)), tuple(range(split, len(shape)))
  if target.slice_permute:
    moved = tuple(target.slice_permute)
    in_axes = tuple(moved.index(a) for a in in_axes)
    out_axes = tuple(moved.index(a) for a in out_axes)
  return Layout(in_axes, out_axes)


@dataclasses.dataclass(frozen=True)
class Mapping:
  """How a checkpoint's PyTorch keys become paths of a parameter tree.

  Attributes:
    rules: Tunix's format: a regex matching a whole PyTorch key -> ``(target,
      transform)``; ``target`` is a '.'-separated path that may use the regex's
      groups (``r"layers.\\1.attn.q_proj.w"``), ``transform`` None or
      ``(permute, reshape)`` of the tensor (either may be None).
    stacks: regex matching a whole target -> ``(path, index, slice_permute)``:
      the target is slice ``index`` of the stacked parameter ``path`` (both may
      use the regex's groups; an index of None: the whole parameter), after
      transposing it by ``slice_permute`` (or None).
    model_types: the ``model_type`` values of ``config.json`` this mapping is
      for (empty: not checked).
    architectures: the ``architectures`` of ``config.json`` it is for (empty:
      not checked).
    name: what the errors call it.

  Example:
    >>> m = Mapping({r"model\\.layers\\.([0-9]+)\\.mlp\\.up_proj\\.weight":
    ...              (r"layers.\\1.up.kernel", ((1, 0), None))}, model_types=("llama",))
    >>> t = m.resolve("model.layers.3.mlp.up_proj.weight", "ckpt")
    >>> t.path, t.shape((64, 32))
    ('layers/3/up/kernel', (32, 64))
  """

  rules: dict
  stacks: dict = dataclasses.field(default_factory=dict)
  model_types: tuple[str, ...] = ()
  architectures: tuple[str, ...] = ()
  name: str = "custom"

  def __post_init__(self):
    try:
      compiled = [(re.compile(p), r, t) for p, (r, t) in dict(self.rules).items()]
      stacks = [(re.compile(p), s) for p, s in dict(self.stacks).items()]
    except (re.error, TypeError, ValueError) as e:
      raise LoraError(f"Mapping {self.name!r}: a rule is not (regex -> (target, transform)) "
                      f"({e})") from None
    object.__setattr__(self, "_compiled", compiled)
    object.__setattr__(self, "_stacks", stacks)

  def resolve(self, key: str, where: str) -> Target | None:
    """The target of PyTorch ``key``; None when it is read by no one (``unused.``).

    Raises:
      LoraFileError: no rule, or more than one, matches ``key``.
    """
    hits = [(m, r, t) for p, r, t in self._compiled for m in [p.fullmatch(key)] if m]
    if len(hits) != 1:
      why = "no rule of" if not hits else f"{len(hits)} rules of"
      raise LoraFileError(f"{where}: '{key}' matches {why} the {self.name} mapping; is the "
                          f"checkpoint for this model?")
    m, repl, transform = hits[0]
    dotted = m.expand(repl)
    if dotted.startswith("unused."):
      return None
    permute, reshape = transform if transform else (None, None)
    path, index, slice_permute = dotted.replace(".", "/"), None, None
    for pattern, (stack_path, stack_index, perm) in self._stacks:
      s = pattern.fullmatch(dotted)
      if s:
        path, slice_permute = s.expand(stack_path).replace(".", "/"), perm
        index = None if stack_index is None else int(s.expand(stack_index))
        break
    return Target(key, path, index, tuple(permute) if permute else None,
                  tuple(reshape) if reshape else None,
                  tuple(slice_permute) if slice_permute else None)

  def check_config(self, config: dict | None, where: str) -> None:
    """Refuses a ``config.json`` for another architecture than the mapping's."""
    if config is None:
      return
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if self.model_types and model_type not in self.model_types:
      raise LoraFileError(f"'{where}/config.json': model_type {model_type!r} is not one the "
                          f"{self.name} mapping reads ({', '.join(self.model_types)})")
    if self.architectures and archs and not set(archs) & set(self.architectures):
      raise LoraFileError(f"'{where}/config.json': architectures {archs} are not those the "
                          f"{self.name} mapping reads ({', '.join(self.architectures)})")


# Tunix family -> (the module holding its mapping, model_types, architectures).
TUNIX_FAMILIES = {
    "llama3": ("tunix.models.llama3.params", ("llama",), ("LlamaForCausalLM",)),
    "qwen3": ("tunix.models.qwen3.params", ("qwen3", "qwen3_moe"),
              ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")),
    "gemma3": ("tunix.models.gemma3.params_safetensors", ("gemma3_text",),
               ("Gemma3ForCausalLM",)),
}


def _tunix_stacks(family: str, cfg: Any) -> dict:
  if family == "gemma3":
    # Tunix's preprocessing: q (D, N, H) -> (N, D, H); k, v -> (K, D, H) stacked
    # as kv_einsum (2, K, D, H), or with q as qkv_einsum (3, N, D, H) when N == K.
    fused = cfg.num_heads == cfg.num_kv_heads
    to_ndh = (1, 0, 2)
    if fused:
      return {rf"tmp\.layers\.([0-9]+)\.attn\.{s}": (r"layers.\1.attn.qkv_einsum.w", str(i),
                                                      to_ndh) for i, s in enumerate("qkv")}
    return {r"tmp\.layers\.([0-9]+)\.attn\.q": (r"layers.\1.attn.q_einsum.w", None, to_ndh),
            r"tmp\.layers\.([0-9]+)\.attn\.k": (r"layers.\1.attn.kv_einsum.w", "0", to_ndh),
            r"tmp\.layers\.([0-9]+)\.attn\.v": (r"layers.\1.attn.kv_einsum.w", "1", to_ndh)}
  if family == "qwen3":
    # Tunix's _stack_experts: experts i of one layer stacked on axis 0.
    return {r"layers\.([0-9]+)\.mlp\.experts\.([0-9]+)\.(gate|up|down)_proj\.kernel":
            (r"layers.\1.mlp.\3_proj", r"\2", None)}
  return {}


def tunix_family(model_or_config: Any) -> str | None:
  """The Tunix family (``"llama3"``...) of a Tunix model or config, or None."""
  config = getattr(model_or_config, "config", model_or_config)
  module = type(config).__module__
  m = re.fullmatch(r"tunix\.models\.([a-z0-9_]+)\.model", module)
  return m.group(1) if m and m.group(1) in TUNIX_FAMILIES else None


def tunix_mapping(model_or_config: Any) -> Mapping:
  """The ``Mapping`` of a google-tunix Llama 3, Qwen 3 or Gemma 3 model (or its
  ``ModelConfig``), built from Tunix's own ``_get_key_and_transform_mapping``.

  Raises:
    LoraError: the model is not of a Tunix family jlora has a mapping for, or
      the installed Tunix lacks the function.

  Example:
    >>> tunix_mapping(object())
    Traceback (most recent call last):
    ...
    jlora.errors.LoraError: jlora.hf has no mapping for a model of type object (it knows google-tunix's llama3, qwen3, gemma3 models); pass mapping=jlora.hf.Mapping(...)
  """
  family = tunix_family(model_or_config)
  if family is None:
    kind = type(model_or_config).__name__
    raise LoraError(f"jlora.hf has no mapping for a model of type {kind} (it knows "
                    f"google-tunix's {', '.join(TUNIX_FAMILIES)} models); pass "
                    f"mapping=jlora.hf.Mapping(...)")
  config = getattr(model_or_config, "config", model_or_config)
  module_name, model_types, archs = TUNIX_FAMILIES[family]
  try:
    rules = importlib.import_module(module_name)._get_key_and_transform_mapping(config)
  except (ImportError, AttributeError) as e:
    raise LoraError(f"{module_name}._get_key_and_transform_mapping, Tunix's table of "
                    f"Hugging Face keys for {family}, is not there ({e}); jlora.hf reads "
                    f"google-tunix 0.1.7's") from None
  return Mapping(rules, _tunix_stacks(family, config), model_types, archs,
                 name=f"tunix {family}")
