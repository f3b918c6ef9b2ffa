"""Training an inverter on a store, with Accelerate (one CPU, one GPU, or many processes)."""
