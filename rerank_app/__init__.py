"""Rerank Inspector's web app: a Gradio front end over rerank_core (the core never imports this package)."""
