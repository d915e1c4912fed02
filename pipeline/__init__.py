"""gedistill library: pure logic (prompts, parsing, windows, losses, metrics) and adapters (stores, backends, checkpoints)."""

__version__ = "0.1.0"
