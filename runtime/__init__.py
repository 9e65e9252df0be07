"""posterrt.runtime: the torch-free client (contracts, schedulers, backends, pipelines, CLI)."""
__version__ = "0.1.0"
