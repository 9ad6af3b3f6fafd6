"""The real-pool benchmark (issue 6): see run.py."""
