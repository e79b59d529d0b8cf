"""Synthetic result rows for the scale benchmarks: what the model stage would emit for an archive of
multi-page documents, as Arrow tables of RESULT_SCHEMA, built with numpy (no model, no rendering).

Document `i` is `s3://archive-bench/collection-XXX/box-YYYY/doc-IIIIIIII.pdf` with a fixed ETag; each of
its pages has one row per task. Texts come from a pool of generated sentences, so files compress
like real OCR output rather than to nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from scriptorium.core.schema import RESULT_SCHEMA

PAGES_PER_DOCUMENT = 50
TASKS = ("ocr", "caption")
MODEL = "HuggingFaceM4/idefics2-8b"
PROMPTS = {task: f"User:<image>Please {task} this page.<end_of_utterance>\nAssistant:" for task in TASKS}
GENERATION = json.dumps({"max_new_tokens": 512, "repetition_penalty": 1.0, "do_sample": False,
                         "temperature": 1.0, "top_p": 1.0, "stop_strings": []})
WORDS = ("archive letter ledger map council parish minutes receipt deed estate survey harbour railway "
         "register census account invoice tithe court petition charter schedule inventory").split()


def source_uri(i: int) -> str:
    return f"s3://archive-bench/collection-{i % 997:03d}/box-{i % 7919:04d}/doc-{i:08d}.pdf"


def source_etag(i: int, version: int = 0) -> str:
    return f"{(i * 2654435761 + version * 40503) % 2**64:016x}{i:016x}"


def _sentences(rng: np.random.Generator, n: int = 1024) -> pa.Array:
    return pa.array([" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(n)])


class ResultRows:
    """Tables of result rows for given documents, pages and tasks (all ok unless told otherwise)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.texts = _sentences(self.rng)

    def table(self, documents: np.ndarray, pages: np.ndarray, tasks: np.ndarray, run_id: str,
              failed: np.ndarray | None = None) -> pa.Table:
        """One row per (documents[k], pages[k], TASKS[tasks[k]]); `failed[k]` makes row k an error row."""
        n = len(documents)
        unique, inverse = np.unique(documents, return_inverse=True)
        uris = pa.array([source_uri(int(i)) for i in unique]).take(pa.array(inverse))
        etags = pa.array([source_etag(int(i)) for i in unique]).take(pa.array(inverse))
        task_names = pa.array(TASKS).take(pa.array(tasks))
        failed = np.zeros(n, bool) if failed is None else failed
        status = pa.array(np.where(failed, "error", "ok"))
        text = self.texts.take(pa.array(self.rng.integers(0, len(self.texts), n)))
        output_tokens = self.rng.integers(20, 512, n).astype(np.int32)
        null_string = pa.nulls(n, pa.string())
        columns = {
            "source_uri": uris,
            "page": pa.array(pages.astype(np.int32)),
            "n_pages": pa.array(np.full(n, PAGES_PER_DOCUMENT, np.int32)),
            "member": null_string,
            "task": task_names,
            "question": null_string,
            "prompt": pa.array([PROMPTS[t] for t in TASKS]).take(pa.array(tasks)),
            "text": pa.array(np.where(failed, None, text.to_numpy(zero_copy_only=False)), pa.string()),
            "status": status,
            "error": pa.array(np.where(failed, "generate failed: OutOfMemoryError: CUDA out of memory", None),
                              pa.string()),
            "stage": pa.array(np.where(failed, "generate", None), pa.string()),
            "model": pa.array(np.full(n, MODEL)),
            "max_new_tokens": pa.array(np.full(n, 512, np.int32)),
            "n_input_tokens": pa.array(self.rng.integers(300, 400, n).astype(np.int32)),
            "n_output_tokens": pa.array(output_tokens),
            "truncated": pa.array(output_tokens == 511),
            "degenerate": pa.array(np.zeros(n, bool)),
            "route": pa.array(np.full(n, "model")),
            "generation": pa.array(np.full(n, GENERATION)),
            "content_hash": null_string,
            "dedup_of": null_string,
            "width": pa.array(np.full(n, 693, np.int32)),
            "height": pa.array(np.full(n, 980, np.int32)),
            "source_size": pa.array((2_000_000 + documents * 17 % 1_000_000).astype(np.int64)),
            "source_etag": etags,
            "run_id": pa.array(np.full(n, run_id)),
            "replica": pa.array(np.full(n, "0a1b2c3d/9f8e7d6c")),
            "node": pa.array(np.full(n, "0a1b2c3d4e5f")),
            "generate_s": pa.array(self.rng.uniform(2, 9, n).astype(np.float32)),
        }
        # Columns planning and summaries never read (confidence, ...) stay null, as in error rows.
        columns.update({f.name: pa.nulls(n, f.type) for f in RESULT_SCHEMA if f.name not in columns})
        return pa.table(columns, schema=RESULT_SCHEMA)
