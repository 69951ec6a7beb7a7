"""The control plane: keys and JWKS, the agent registry, and (later) the admin REST API."""
