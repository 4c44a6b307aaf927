"""The core both halves share: image preprocessing, caption encoding, the artifact contract.

numpy, Pillow and tokenizers only: no torch, no web framework, and nothing from ``service``
or ``model_training`` (tests/test_layers.py fails if that changes). Training imports it to
prepare data and write artifacts; the service imports it to read artifacts and requests.
"""
