"""The stages of a job (render, routes, preprocess, model), their declared list (stages.py), and the two
ways to walk it: on Ray Data (processor.py) and in-process (local.py)."""
