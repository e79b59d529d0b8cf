"""The bottom layer: the job spec, the Arrow schemas and unit keys, file kinds, errors, pixel packing and
redaction. It imports nothing of ours, so every other layer (connectors, pipeline, jobs) can use it."""
