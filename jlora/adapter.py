"""0.2's path of the adapter base class and kind registry, kept stable.

jlora 0.2.0's CHANGELOG tells users to register a new adapter kind with
``jlora.adapter.register_kind``; the module now lives at
``jlora.adapters.adapter`` (``jlora.adapters.register_kind``). Its names are
re-exported here so that code written against 0.2 keeps working. Nothing in
jlora imports this module.

Example:
  >>> import jlora.adapter, jlora.adapters
  >>> jlora.adapter.register_kind is jlora.adapters.register_kind
  True
"""

from jlora.adapters.adapter import (Adapter, array_fields, is_adapter, kind_class, known_kinds,
                                    register_kind, static_fields)

__all__ = ["Adapter", "array_fields", "is_adapter", "kind_class", "known_kinds", "register_kind",
           "static_fields"]
