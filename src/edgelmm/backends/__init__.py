"""Backends: one interface over every engine (see base.py)."""
