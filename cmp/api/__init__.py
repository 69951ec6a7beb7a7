"""The CMP's REST API: one module per resource, each a list of `Operation`s."""
