"""The model area: loading (loading.py), batching and collation (collate.py, budget.py), image features
(features.py), the generation stage (stage.py) and what keeps it safe (journal.py, degenerate.py), plus
the tiny offline checkpoint the tests and the demo use (tiny.py)."""
