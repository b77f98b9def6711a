"""lotus: deployment-oriented compression of pretrained Vision Transformers.

Heavy modules (torch, timm, onnx) are imported lazily so that ``lotus --help`` stays instant.
"""

__version__ = "0.1.0"
