"""The workbench's user-facing errors: bad input (a file, a config value, a model, a plan), never a bug.

`workbench.cli` prints a `WorkbenchError` as one line and exits 2; any other exception is a bug and keeps its
traceback. Each error is also a `ValueError`, so callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Input the workbench cannot use, with a message saying which and why."""


class ConfigError(WorkbenchError, ValueError):
    """A configuration file or value that cannot be used (or a study design it cannot run)."""


class PromptDataError(WorkbenchError, ValueError):
    """A names, contexts or audit file that is malformed or inconsistent; the message names file and field."""


class PlanError(WorkbenchError, ValueError):
    """A pruning plan that is malformed or does not fit the model."""


class ModelError(WorkbenchError, ValueError):
    """A model name, file or download that cannot be used, with a message saying why."""


class RunDirError(WorkbenchError, ValueError):
    """A run directory that cannot be created or a path that leaves it."""
