"""Built-in architecture descriptions; importing this package registers them."""

from llmopt.exporter.architectures import decoders, encoders  # noqa: F401
