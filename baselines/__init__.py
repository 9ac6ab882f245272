"""Baseline adapters, one file each; each registers itself with harness.registry.register."""
