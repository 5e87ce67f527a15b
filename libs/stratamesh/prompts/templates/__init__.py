"""Prompt template files (TOML), one per ``name@version``; see :mod:`..registry`."""
