"""Inverters: a log-prob observation in, the hidden prompt out (config, features, the
architectures, the neighbour memory, checkpoint I/O)."""
