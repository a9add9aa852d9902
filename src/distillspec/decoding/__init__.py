"""Decoding: sampling, the acceptance rule, the KV cache, metrics and the step-level engine.

This layer imports nothing from ``training``, ``models`` or ``tools``.
"""
