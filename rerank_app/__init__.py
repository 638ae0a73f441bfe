"""Rerank Inspector's web app: a Gradio front end over rerank_core (the core never imports this package)."""

import os

# Set before torch is imported (OpenMP reads it once, when it loads). The app's forward passes run on one thread
# (rerank_core/compute.py), whose OpenMP threads by default spin ~300,000 times after each parallel region before
# they sleep. Beside a fine-tune (a second process on the same cores) the two spin against each other: a 330-token
# pass took 617 ms and the training loop ran 4 steps where it ran 11. Spinning 1,000 times: 239 ms and 13 steps
# beside it, 169 ms alone (130 ms with the default spin; 202 ms when every request thread scored itself, as
# before). The fine-tunes the app starts inherit it; a value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
