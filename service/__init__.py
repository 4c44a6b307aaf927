"""Image + text classification service (FastAPI on ONNX Runtime).

Kept import-light: ``service.preprocessing`` and ``service.artifact`` are imported by the
training package too, which must not pull in the web stack.
"""

__version__ = "0.1.0"
