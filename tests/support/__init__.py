"""Helpers and stand-ins shared by tests and benchmarks; fixtures stay in conftest.py."""
