"""Running studies: models, data, the training of one cell, executors (Ray Tune or local),
the Parquet results store and the `study` command-line tool.

Importing `study` itself pulls in neither torch nor ray (the analysis package reads the store
schema through it); the modules that need them import them.
"""
__version__ = "0.1.0"
