"""The shared start of every bench script: the repository's packages first, libraries quiet and offline.

`python bench/x.py` puts bench/ first on sys.path, where bench/pipeline.py would shadow the `pipeline`
package, so importing this module puts the repository ahead of it. Standard library only: it runs on a
GPU machine that has torch and transformers and nothing else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def quiet_env() -> None:
    """What tests/conftest.py sets too: no Ray usage reports or auth, no hub downloads, no tokenizer threads."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
