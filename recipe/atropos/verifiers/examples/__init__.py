"""Example verifiers environments for the runner (the CPU demo's is arithmetic.py)."""
