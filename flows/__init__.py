"""Prefect flows over the DVC stages (see flows/README.md): ``python -m flows.serve`` serves them."""
