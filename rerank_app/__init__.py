"""Rerank Inspector's web app: a Gradio front end over rerank_core (the core never imports this package)."""

from rerank_app.memory import set_native_runtime_options

# Before torch is imported: OpenMP reads its spin count once, when torch loads it (rerank_app/memory.py).
set_native_runtime_options()
