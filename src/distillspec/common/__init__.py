"""Shared plumbing below every layer: config machinery, runtime policy, files, run folders."""
