"""Prefect flows over the DVC stages (README, *Orchestration*): ``python -m flows.serve`` serves them."""
