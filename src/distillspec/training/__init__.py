"""Training: the DistillSpec recipe, data, divergences, policies, evaluation, checkpoints and
the loop. Imports ``common``, ``decoding`` and ``models``, never ``tools``."""
