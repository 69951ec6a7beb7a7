"""Components of our own that this runtime installs for lfx (its components path)."""
