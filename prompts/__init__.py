"""The study's prompt data (names, contexts, scenarios, neutral sentences; see README.md in this folder).

Shipped with the workbench as the package `workbench.prompts` (pyproject.toml maps it from this folder) and read
by `workbench.readout.prompts`; the folder has no code.
"""
