"""Real FLUX.2 model configs shipped with the package, so nothing is fetched to identify or build a model."""
