"""Integrations with other libraries (loaded only when used)."""
