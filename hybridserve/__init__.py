"""hybridserve: serve, measure and route between a transformer and a Mamba-2 hybrid."""
__version__ = "0.1.0"
