"""The starter files `python -m tensorlite.exercises start DIR` copies: one per exercise, the
functions to write raising NotImplementedError, each docstring stating the task."""
