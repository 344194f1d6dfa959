"""Hugging Face checkpoints into JAX models' parameter trees: ``jlora.hf``.

``load(path, model)`` reads what ``save_pretrained`` writes (``config.json``
and ``model.safetensors``, or the shards ``model.safetensors.index.json``
lists; bfloat16, float16 or float32) into google-tunix's Llama 3, Qwen 3 and
Gemma 3 models, one tensor at a time:

* dense weights as arrays, transformed to Tunix's layouts by Tunix's own
  table of Hugging Face keys (``tunix/models/<family>/params.py``);
* a ``*-bnb-4bit`` checkpoint's 4-bit weights as ``jlora.NF4Array`` leaves of
  the bytes bitsandbytes wrote (read as ``jlora.bnb`` reads them), not
  dequantized;
* with ``quantize``, dense weights stored in NF4 as they are read: the codes
  and absmax bitsandbytes' ``quantize_4bit`` gives the same PyTorch weight,
  without the dense model ever in memory.

Host memory while loading stays within the loaded tree plus about one tensor
(``benchmarks/bench_hub_load.py`` measures it). Other models load with a
``Mapping`` of their own, in Tunix's table format.

Only JSON and raw tensor bytes are read: nothing is unpickled and no code
from the checkpoint runs. Bad input is refused with one line naming the
file and entry: a model without a mapping, a checkpoint for another
architecture, a shape mismatch, a missing shard, a dtype it cannot read.

* ``load(path, model, ...)``: the checkpoint into the model (or a tree);
* ``Mapping``: PyTorch keys to parameter paths, with their transforms;
* ``tunix_mapping(model)``: the ``Mapping`` of a Tunix model, from Tunix.

The modules: ``tensors`` (the files, read tensor by tensor), ``mapping``
(keys to paths and NF4 layouts) and ``load``.
"""

from jlora.hf.load import load
from jlora.hf.mapping import Mapping, tunix_mapping

__all__ = ["Mapping", "load", "tunix_mapping"]
