"""Flows shipped with the runtime, and the scripts that build them."""
