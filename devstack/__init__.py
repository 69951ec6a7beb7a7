"""The embedded default stack: real services on loopback for dev, demo, tests and CI."""
