"""The command-line commands, one module each (see mf_ext/cli.py)."""
