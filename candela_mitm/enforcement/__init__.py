"""Enforcement: making traffic take the proxy; the only core package importing ebpf, netns, certs."""
