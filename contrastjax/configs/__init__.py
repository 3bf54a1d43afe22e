"""Shared pieces of the config files under ``configs/`` (recipes, argument parsing)."""
