"""Backends: one module per backend, each exposing ``BACKEND`` (see ``_dispatch.py``)."""
