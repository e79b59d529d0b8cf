"""Routes: answer what can be answered without the model, before a page reaches the GPU (stage.py),
from a PDF's text layer (text_layer.py), by Tesseract (tesseract.py), or from an identical page's result
(dedup.py)."""
