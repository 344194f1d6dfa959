"""Name rules: how Flax parameter paths name the PyTorch modules PEFT sees.

``Rules`` maps a parameter path (``transformer/h/0/attn/c_attn/kernel``) to a
PyTorch module name (``transformer.h.0.attn.c_attn``), says which modules
store their weight ``(in, out)`` (``transformers``' ``Conv1D``), and how the
Flax leaves are named in PyTorch. Ready-made rules cover plain module trees,
``nn.scan`` stacks and Hugging Face models.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence, Union

from jlora.errors import LoraSpecError
from jlora.layout import Layout
from jlora.peft.names import DEFAULT_LEAF_NAMES

# How a Flax 2-D kernel is stored: (in, out), (out, in), or unknown.
KERNEL_ORDERS = ("in_out", "out_in", None)

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _split_template(template: str) -> list[tuple[str, str]]:
  """``"a/{x}/b"`` -> ``[("lit", "a/"), ("var", "x"), ("lit", "/b")]``."""
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    if m.start() > pos:
      parts.append(("lit", template[pos:m.start()]))
    parts.append(("var", m.group(1)))
    pos = m.end()
  if pos < len(template):
    parts.append(("lit", template[pos:]))
  return parts


@dataclasses.dataclass(frozen=True)
class _Pattern:
  flax: str
  torch: str

  def __post_init__(self):
    fvars = [v for kind, v in _split_template(self.flax) if kind == "var"]
    tvars = [v for kind, v in _split_template(self.torch) if kind == "var"]
    for side, names in (("flax", fvars), ("torch", tvars)):
      if len(set(names)) != len(names):
        raise LoraSpecError(f"Rules pattern {(self.flax, self.torch)}: a placeholder "
                            f"appears twice on the {side} side")
    missing = sorted(set(fvars) - set(tvars))
    if missing:
      raise LoraSpecError(f"Rules pattern {(self.flax, self.torch)}: placeholders "
                          f"{missing} of the Flax side are not used in the module name")

  def _regex(self, side: str) -> re.Pattern:
    fvars = {v for kind, v in _split_template(self.flax) if kind == "var"}
    out = []
    for kind, text in _split_template(self.flax if side == "flax" else self.torch):
      if kind == "lit":
        out.append(re.escape(text))
      elif side == "flax":
        out.append(f"(?P<{text}>[^/]+(?:/[^/]+)*)")
      elif text in fvars:
        out.append(f"(?P<{text}>[^.]+(?:\\.[^.]+)*)")
      else:  # a stack index
        out.append(f"(?P<{text}>\\d+)")
    return re.compile("".join(out))

  def forward(self, module_path: str) -> str | None:
    m = self._regex("flax").fullmatch(module_path)
    if m is None:
      return None
    out, n_stack = [], 0
    for kind, text in _split_template(self.torch):
      if kind == "lit":
        out.append(text)
      elif text in m.groupdict():
        out.append(m.group(text).replace("/", "."))
      else:
        out.append("{%d}" % n_stack)
        n_stack += 1
    return "".join(out)

  def backward(self, module: str) -> tuple[str, tuple[int, ...]] | None:
    m = self._regex("torch").fullmatch(module)
    if m is None:
      return None
    fvars = {v for kind, v in _split_template(self.flax) if kind == "var"}
    index = tuple(int(m.group(v)) for kind, v in _split_template(self.torch)
                  if kind == "var" and v not in fvars)
    path = "".join(text if kind == "lit" else m.group(text).replace(".", "/")
                   for kind, text in _split_template(self.flax))
    return path, index


@dataclasses.dataclass(frozen=True)
class Rules:
  """How Flax parameter paths name the PyTorch modules that PEFT sees.

  A rule maps a parameter path minus its leaf name (the *module path*, e.g.
  ``transformer/h/0/attn/c_attn`` for ``.../c_attn/kernel``) to a PyTorch
  module name. Each pattern is a pair ``(flax_template, torch_template)``;
  the first whose Flax side matches the whole module path wins:

  * ``{name}`` on the Flax side matches one or more '/'-separated segments
    and is written on the PyTorch side with '.' between them;
  * a placeholder that appears only on the PyTorch side (``{layer}``) is a
    stack index: weights stacked by ``nn.scan`` become one module per index
    of their stack axis (the stack axes of the LoRA layout, in order);
  * a last segment that joins names with ``+`` (``self_attn.k_proj+v_proj``)
    names a fused kernel: several PyTorch modules stacked along the kernel's
    first output axis (Gemma's ``kv_einsum`` ``(2, K, D, H)``), one entry per
    module. Written, each module gets the kernel's ``lora_A`` and its own
    slice of ``lora_B``; read, a folder must adapt all of them
    (``jlora.peft.fused``).

  The leaf name becomes the PyTorch parameter name through ``leaf_names``
  (``kernel`` -> ``weight``, ``scale`` -> ``weight``, ...); this matters for
  weights trained in full (PEFT's ``modules_to_save``), which are stored
  under their PyTorch names and layouts.

  Instead of a ``Rules``, ``jlora.peft.save`` and ``jlora.peft.load`` also accept a
  function ``fn(path) -> str | None`` from a full parameter path to the
  module name, with ``"{}"`` fields for stack indices
  (``"model.layers.{}.self_attn.q_proj"``); ``None`` means "no module".

  Attributes:
    patterns: ``(flax_template, torch_template)`` pairs, tried in order.
    fan_in_fan_out: which PyTorch modules store their weight ``(in, out)``
      (``transformers``' ``Conv1D``, as in GPT-2) rather than ``(out, in)``
      (``nn.Linear``): ``True`` for all, ``False`` for none, or a regex matched
      in full against the module name. Decides the config's
      ``fan_in_fan_out`` and whether a fully trained kernel is transposed.
    leaf_names: Flax leaf name -> PyTorch parameter name.
    kernel_leaves: leaf names of linear weights: the leaves LoRA factors
      belong to when a file is read.
    kernel_order: how the Flax side stores a 2-D kernel: ``"in_out"`` (Flax's
      ``Dense``, ``nnx.Linear``), ``"out_in"`` (PyTorch-style: Equinox,
      ``transformers``' Flax GPT-2), or None when unknown. It decides the
      layout of a 2-D kernel read from a PEFT file (and the order of the in
      and out axes of a stacked or multi-axis one, see
      ``jlora.peft.axes.layouts_from_shapes``), and whether a kernel trained in
      full is transposed. With None, the file's shapes must tell: a square
      kernel is refused, naming it. Explicit ``layouts`` (from
      ``jlora.infer_layouts``, which reads them from the model) always win.
    function: if given, used instead of ``patterns`` (see above).
    conv: which PyTorch modules are convolutions (``nn.Conv1d/2d/3d``): True,
      False or a regex matched in full against the module name. Their Flax
      kernels ``(*window, in, out)`` are written as PEFT's convolution factors.
      (A file tells by its tensors' shapes; this is for writing.)
    embedding_leaves: leaf names of ``nn.Embedding`` tables ``(vocab, d)``;
      their LoRA is PEFT's ``lora_embedding_A``/``lora_embedding_B``.
    tied: PyTorch embedding module -> the modules whose weight is the same
      tensor (``{"model.embed_tokens": ("lm_head",)}`` for a model with
      ``tie_word_embeddings``). jlora adapts a tied table in all its uses, which
      PEFT does with ``ensure_weight_tying=True`` on ``embed_tokens``: the tied
      modules then get the same factors, and a file that adapts only the lookup
      of a tied table is refused.
    parameters: which weights PyTorch holds as a bare ``nn.Parameter`` rather
      than a module's (fused MoE experts): a regex matched in full against
      the PyTorch parameter name (``model.layers.0.mlp.experts.gate_up_proj``),
      or True/False. Their LoRA is PEFT's ``target_parameters``; the
      parameter's name is the leaf name (through ``leaf_names``).
    transposed_parameters: which of those parameters PEFT reads as
      ``(experts, out, in)`` (modules with ``is_transposed = True``): a regex
      over parameter names, or True/False.
    parameter_order: parameter names in the order PyTorch modules register
      them; needed when several parameters of one module are adapted (PEFT
      nests one wrapper per parameter in that order and names them so).
    layouts: regex -> ``jlora.Layout`` of the model's multi-axis kernels
      (matched in full against parameter paths), which ``jlora.peft.load``
      uses where its own ``layouts`` argument says nothing.

  Example:
    A model whose Flax names differ from the PyTorch ones: write one pattern
    per difference, then a catch-all.

    >>> rules = Rules(patterns=[
    ...     ("params/blocks_{i}/attn/{proj}", "model.layers.{i}.self_attn.{proj}"),
    ...     ("params/{module}", "{module}")])
    >>> rules("params/blocks_3/attn/q_proj/kernel")
    'model.layers.3.self_attn.q_proj'
    >>> rules.param_path("model.layers.3.self_attn.q_proj")
    ('params/blocks_3/attn/q_proj/kernel', ())

    The ready-made rules:

    >>> rules = Rules.scanned(stack="params/layers", prefix="model.layers",
    ...                       renames={"query": "self_attn.q_proj"})
    >>> rules("params/layers/query/kernel")          # one module per layer
    'model.layers.{0}.self_attn.q_proj'
    >>> rules("params/embed/embedding")
    'embed'
    >>> rules.param_path("model.layers.3.self_attn.q_proj")
    ('params/layers/query/kernel', (3,))
    >>> Rules.gpt2()("transformer/h/0/attn/c_attn/kernel")
    'transformer.h.0.attn.c_attn'
    >>> Rules.gpt2().kernel_order, Rules.llama()("model/layers/0/self_attn/q_proj/kernel")
    ('out_in', 'model.layers.0.self_attn.q_proj')
  """

  patterns: Sequence[tuple[str, str]] = (("params/{module}", "{module}"),
                                         ("{module}", "{module}"))
  fan_in_fan_out: Union[bool, str] = False
  leaf_names: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_LEAF_NAMES))
  kernel_leaves: Sequence[str] = ("kernel",)
  kernel_order: str | None = "in_out"
  function: Callable[[str], str | None] | None = None
  conv: Union[bool, str] = False
  embedding_leaves: Sequence[str] = ("embedding",)
  tied: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  parameters: Union[bool, str] = False
  transposed_parameters: Union[bool, str] = False
  parameter_order: Sequence[str] = ()
  layouts: Mapping[str, Layout] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "patterns", tuple(tuple(p) for p in self.patterns))
    object.__setattr__(self, "kernel_leaves", tuple(self.kernel_leaves))
    for p in self.patterns:
      if len(p) != 2 or not all(isinstance(s, str) for s in p):
        raise LoraSpecError(f"Rules patterns are (flax_template, torch_template) "
                            f"string pairs, got {p!r}")
    object.__setattr__(self, "_compiled", tuple(_Pattern(*p) for p in self.patterns))
    if self.kernel_order not in KERNEL_ORDERS:
      raise LoraSpecError(f"Rules.kernel_order must be one of {KERNEL_ORDERS}, got "
                          f"{self.kernel_order!r}")
    for name in ("fan_in_fan_out", "conv", "parameters", "transposed_parameters"):
      value = getattr(self, name)
      if isinstance(value, str):
        try:
          re.compile(value)
        except re.error as e:
          raise LoraSpecError(f"Rules.{name}: invalid regex {value!r}: {e}") from None
      elif not isinstance(value, bool):
        raise LoraSpecError(f"Rules.{name} must be True, False or a regex, got {value!r}")
    object.__setattr__(self, "embedding_leaves", tuple(self.embedding_leaves))
    object.__setattr__(self, "parameter_order", tuple(self.parameter_order))
    object.__setattr__(self, "tied", {k: tuple(v) for k, v in dict(self.tied).items()})
    for regex, layout in dict(self.layouts).items():
      if not isinstance(layout, Layout):
        raise LoraSpecError(f"Rules.layouts[{regex!r}] must be a jlora.Layout, got {layout!r}")
      try:
        re.compile(regex)
      except re.error as e:
        raise LoraSpecError(f"Rules.layouts: invalid regex {regex!r}: {e}") from None
    object.__setattr__(self, "layouts", dict(self.layouts))

  # Ready-made rules ----------------------------------------------------------

  @classmethod
  def generic(cls, *, fan_in_fan_out: Union[bool, str] = False,
              kernel_order: str | None = "in_out") -> "Rules":
    """'/' becomes '.', the leaf name and a leading ``params`` collection go.

    Fits models whose Flax module tree mirrors the PyTorch one (Flax NNX
    ``blocks/0/query/kernel`` -> ``blocks.0.query``), with Flax's ``(in, out)``
    kernels unless ``kernel_order`` says otherwise.
    """
    return cls(fan_in_fan_out=fan_in_fan_out, kernel_order=kernel_order)

  @classmethod
  def gpt2(cls, *, kernel_order: str | None = "out_in") -> "Rules":
    """``transformers``' Flax GPT-2 (``FlaxGPT2LMHeadModel``, ``FlaxGPT2Model``).

    ``transformer/h/0/attn/c_attn/kernel`` <-> ``transformer.h.0.attn.c_attn``;
    ``c_attn``, ``q_attn``, ``c_proj`` and ``c_fc`` are PyTorch ``Conv1D``
    modules (weights stored ``(in, out)``, PEFT's ``fan_in_fan_out=True``),
    whose Flax port ``FlaxConv1D`` stores its kernel ``(out, in)``. A Flax
    port that stores them ``(in, out)``, as ``nn.Dense`` does, passes
    ``kernel_order="in_out"``.
    """
    return cls(fan_in_fan_out=r"(?:.*\.)?(?:c_attn|q_attn|c_proj|c_fc)",
               kernel_order=kernel_order, tied={"transformer.wte": ("lm_head",)})

  @classmethod
  def llama(cls, *, tie_word_embeddings: bool = False) -> "Rules":
    """``transformers``' Flax Llama and Mistral (``FlaxLlamaForCausalLM``,
    ``FlaxMistralForCausalLM``): ``model/layers/0/self_attn/q_proj/kernel`` <->
    ``model.layers.0.self_attn.q_proj``, ``(in, out)`` kernels (``nn.Dense``),
    RMSNorm ``weight`` leaves. ``tie_word_embeddings``: the output head is the
    embedding table (``lm_head`` tied to ``model.embed_tokens``)."""
    return cls(kernel_order="in_out",
               tied={"model.embed_tokens": ("lm_head",)} if tie_word_embeddings else {})

  @classmethod
  def bert(cls) -> "Rules":
    """``transformers``' Flax BERT (``FlaxBertModel``, ``FlaxBertForMaskedLM``...):
    ``bert/encoder/layer/0/attention/self/query/kernel`` <->
    ``bert.encoder.layer.0.attention.self.query``, ``(in, out)`` kernels, LayerNorm
    ``scale`` -> ``weight``."""
    return cls(kernel_order="in_out")

  @classmethod
  def scanned(cls, *, stack: str = "params/layers", prefix: str = "model.layers",
              renames: Mapping[str, str] | None = None,
              fan_in_fan_out: Union[bool, str] = False,
              kernel_order: str | None = "in_out") -> "Rules":
    """A Linen ``nn.scan`` stack: ``{stack}/<name>`` -> ``{prefix}.{i}.<name>``.

    ``i`` is the index along the weight's stack axis. ``renames`` maps a Flax
    module path inside the stack to the PyTorch one
    (``{"attn/query": "self_attn.q_proj"}``). Parameters outside the stack
    follow the generic rule.
    """
    pats = [(f"{stack}/{flax}", f"{prefix}.{{layer}}.{torch}")
            for flax, torch in (renames or {}).items()]
    pats.append((f"{stack}/{{name}}", f"{prefix}.{{layer}}.{{name}}"))
    pats += list(cls.__dataclass_fields__["patterns"].default)
    return cls(patterns=tuple(pats), fan_in_fan_out=fan_in_fan_out, kernel_order=kernel_order)

  @classmethod
  def tunix(cls, model: Any, *, tie_word_embeddings: bool | None = None) -> "Rules":
    """google-tunix's Llama 3, Qwen 3 and Gemma 3 (``tunix.models.llama3``,
    ``qwen3``, ``gemma3``) against ``transformers``' ``LlamaForCausalLM``,
    ``Qwen3ForCausalLM`` and ``Gemma3ForCausalLM``.

    The names are read from the installed Tunix's own Hugging Face key table
    (``jlora.peft.tunix``): ``layers/0/attn/q_proj/w`` <->
    ``model.layers.0.self_attn.q_proj``, ``layers/0/mlp/up_proj/kernel`` <->
    ``model.layers.0.mlp.up_proj``; the attention kernels' layouts come with
    the rules (``Rules.layouts``), and Gemma 3's fused ``kv_einsum`` is
    ``k_proj`` and ``v_proj`` (``qkv_einsum``: ``q_proj``, ``k_proj``,
    ``v_proj``).

    Args:
      model: a Tunix model (or a ``jlora.nnx.LoraModule`` around one), its
        ``ModelConfig``, or a family name (``"llama3"``, ``"qwen3"``,
        ``"gemma3"``).
      tie_word_embeddings: whether the output head is the embedding table;
        by default the config's (``weight_tying``, ``use_tied_embedding``;
        always for Gemma 3), False for a family name.

    Raises:
      LoraSpecError: not a supported Tunix family (the message lists them),
        or Tunix is not installed.
    """
    from jlora.peft import tunix
    return tunix.rules(model, tie_word_embeddings)

  @classmethod
  def gemma(cls, model: Any = None, *, transpose_gating_einsum: bool | None = None
            ) -> "Rules":
    """The gemma library's Gemma 3 (google-deepmind ``gemma``: ``gm.nn.Gemma3_1B``,
    ... a Linen ``gm.nn.Transformer``) against ``transformers``'
    ``Gemma3ForCausalLM``.

    ``layer_0/attn/q_einsum/w`` ``(N, D, H)`` <-> ``model.layers.0.self_attn.q_proj``,
    ``layer_0/mlp/linear`` <-> ``model.layers.0.mlp.down_proj``; the fused
    ``kv_einsum`` is ``k_proj+v_proj`` (``qkv_einsum``: ``q_proj+k_proj+v_proj``)
    and ``mlp/gating_einsum`` is ``gate_proj+up_proj``. The table and the
    kernels' layouts (``Rules.layouts``) are stated in ``jlora.peft.gemma``;
    paths may start with the ``params`` collection or not.

    Args:
      model: a ``gemma.gm.nn.Transformer`` or its ``TransformerConfig``, which
        says how ``gating_einsum`` is stored; optional.
      transpose_gating_einsum: without a model: ``gating_einsum`` stored
        ``(2, F, D)`` (True, every Gemma 3 of the library; the default) or
        ``(2, D, F)``.

    Raises:
      LoraSpecError: ``model`` is not a gemma-library Gemma 3 (Gemma 3n is not
        supported).

    Example:
      >>> rules = Rules.gemma()
      >>> rules("params/layer_0/attn/kv_einsum/w")
      'model.layers.0.self_attn.k_proj+v_proj'
      >>> rules("layer_1/mlp/linear")
      'model.layers.1.mlp.down_proj'
    """
    from jlora.peft import gemma
    return gemma.rules(model, transpose_gating_einsum)

  # Mapping -------------------------------------------------------------------

  def layouts_for(self, paths: Sequence[str]) -> dict[str, Layout]:
    """path -> Layout for the ``paths`` that a ``layouts`` regex matches."""
    out: dict[str, Layout] = {}
    for path in paths:
      for regex, layout in self.layouts.items():
        if re.fullmatch(regex, path):
          out[path] = layout
          break
    return out

  def __call__(self, path: str) -> str | None:
    """The module name of a parameter path, with ``{0}``... for stack indices."""
    if self.function is not None:
      return self.function(path)
    module_path = path.rpartition("/")[0]
    if not module_path:
      return None
    for pat in self._compiled:
      name = pat.forward(module_path)
      if name is not None:
        return name
    return None

  def param_path(self, module: str, leaf: str = "kernel"
                 ) -> tuple[str, tuple[int, ...]] | None:
    """The reverse: ``(parameter path, stack index)`` of a PyTorch module.

    Only for pattern rules; ``jlora.peft.load`` itself inverts the forward mapping
    over the actual parameters, so a function rule needs no reverse.
    """
    if self.function is not None:
      raise LoraSpecError("Rules.param_path needs pattern rules, not a function")
    for pat in self._compiled:
      found = pat.backward(module)
      if found is not None:
        return f"{found[0]}/{leaf}", found[1]
    return None

  def is_in_out(self, module: str) -> bool:
    """Whether the PyTorch module stores its weight ``(in, out)``."""
    return _selects(self.fan_in_fan_out, module)

  def is_conv(self, module: str) -> bool:
    """Whether the PyTorch module is a convolution."""
    return _selects(self.conv, module)

  def is_parameter(self, name: str) -> bool:
    """Whether the PyTorch parameter ``name`` is a bare ``nn.Parameter``
    (adapted through PEFT's ``target_parameters``)."""
    return _selects(self.parameters, name)

  def is_transposed(self, name: str) -> bool:
    """Whether PEFT reads the 3-D parameter ``name`` as ``(experts, out, in)``."""
    return _selects(self.transposed_parameters, name)

  def torch_param(self, path: str) -> str:
    """The PyTorch parameter name of a leaf (``kernel`` -> ``weight``; others as named)."""
    leaf = path.rpartition("/")[2]
    return self.leaf_names.get(leaf, leaf)

  def tied_to(self, module: str) -> tuple[str, ...]:
    """The modules whose weight is the embedding ``module``'s table."""
    return tuple(self.tied.get(module, ()))


def _selects(value: Union[bool, str], name: str) -> bool:
  if isinstance(value, bool):
    return value
  return re.fullmatch(value, name) is not None


RulesLike = Union[Rules, Callable[[str], Union[str, None]]]


def as_rules(rules: RulesLike) -> Rules:
  if isinstance(rules, Rules):
    return rules
  if callable(rules):
    return Rules(function=rules)
  raise LoraSpecError(f"rules must be a jlora.peft.Rules or a function path -> module "
                      f"name, got {rules!r}")
