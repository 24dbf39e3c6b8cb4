"""The `selfhost` command line: one module per command group, wired in main.py."""
