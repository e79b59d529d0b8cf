"""The shared start of every bench script: Scriptorium importable, libraries quiet and offline.

Installed (`make install`), `scriptorium` is found as it is anywhere. From a bare checkout, as on a lent
GPU machine that has torch and transformers and nothing else, the repository's top-level folders are
made `scriptorium`'s subpackages the way pyproject.toml maps them. Standard library only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("scriptorium") is None:
    sys.modules["scriptorium"] = types.ModuleType("scriptorium")
    sys.modules["scriptorium"].__path__ = [str(REPO)]


def quiet_env() -> None:
    """What tests/conftest.py sets too: no Ray usage reports or auth, no hub downloads, no tokenizer threads."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
