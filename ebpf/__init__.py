"""Kernel enforcement: bcc-loaded cgroup eBPF programs (guard.c) and their thin loaders."""
