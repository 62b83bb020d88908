"""The notebooks' checks, out of the reader's way: each notebook ends in one short cell that calls its module here,
which asserts what the notebook claims and prints a short summary of the key numbers (compared by
tests/test_notebooks.py)."""
