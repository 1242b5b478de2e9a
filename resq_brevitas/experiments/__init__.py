"""The experiment harness (not needed to use the plugin): evaluation tables, metrics, figures and
video file IO, used by ``recipes/`` and ``benchmarks/``."""
