"""Providers: where a request goes and what comes back, per wire format."""
