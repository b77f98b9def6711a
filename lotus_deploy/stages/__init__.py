"""Stage kinds. Importing this package registers every stage (config class -> function).

Each module holds a pure-data config (``kind`` literal) and a function registered for it with
``@register_stage``. Heavy imports (torch, timm, onnx) stay inside the functions.
"""

from . import bake, bench, evaluate, export, finetune, prune  # noqa: F401
from . import lottery  # noqa: F401
from . import soup, sparsity  # noqa: F401
from . import semi_structured  # noqa: F401
from . import engine  # noqa: F401
