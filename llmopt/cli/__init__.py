"""The ``llmopt`` command line: a thin adapter over the library (argparse lives only here)."""
