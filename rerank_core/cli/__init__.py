"""The command line: `python -m rerank_core COMMAND`, one module per command and the options they share."""
