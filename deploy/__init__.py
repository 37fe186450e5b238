"""Deployment tooling for fedtransfer: credentials, launch commands, service files."""
