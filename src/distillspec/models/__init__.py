"""Models: loading (HF folders, GGUF, built-ins), drafts made from a target, the registry of
built-in models and datasets, and their installation. Imports ``common`` and ``decoding`` only."""
