"""Built-in architecture descriptions; importing this package registers them."""

from llmopt.export.architectures import decoders, encoders  # noqa: F401
