"""recflm: pretrain, tune and serve one text-to-text recommendation model on Ray (P5 paradigm)."""
__version__ = "0.1.0"
