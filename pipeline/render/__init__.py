"""Rendering: files to pages of pixels (stage.py), through the decoders (decoders.py, shards.py), in a
sandboxed child process (sandbox.py), with document rows for document-scope tasks (documents.py)."""
