"""Storage: where bytes live (storage.py), what to read (listing.py, manifest.py), the only writer of an
output (parquet_sink.py) and what it already holds (ledger.py). Imports only `core`."""
