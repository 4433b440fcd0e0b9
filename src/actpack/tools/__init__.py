"""Users of the library (CLI, training, benchmarks, built-in models, data): never imported by it."""
