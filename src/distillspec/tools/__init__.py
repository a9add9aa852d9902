"""Tools: the CLI, generate/datagen, bench, demo and plots. May import every other layer."""
