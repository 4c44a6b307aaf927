"""Thin adapters, one module per protocol: wire format -> rows -> ``Pipeline.run`` -> wire format."""
