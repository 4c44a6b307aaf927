"""Image + text classification service (FastAPI on ONNX Runtime).

Kept import-light (only the version): ``python -m service``, the ``itc`` command and tools that read
``service.__version__`` import this first. What training and serving share lives in ``classifier_core``.
"""

__version__ = "0.1.0"
