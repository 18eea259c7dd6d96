"""distillgate's gateway: the OpenAI-compatible HTTP front, its store, recorder, cache and metrics."""

__version__ = "0.1.0"
