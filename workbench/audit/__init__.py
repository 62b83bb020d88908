"""The audit: the answer table of a model on a prompt set and its statistics (SMD, significance, bias types)."""
