"""Observability: spans and metrics; fails open."""
