"""Laptop mode: local runtimes (Ollama, LM Studio) and their settings."""
