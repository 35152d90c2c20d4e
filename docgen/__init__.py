"""Generators of the reference pages under docs/reference/ (run generate.py); not part of the package."""
