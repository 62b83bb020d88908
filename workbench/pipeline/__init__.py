"""The study pipeline: stages over a config cached in a run directory, the report and its figures."""
