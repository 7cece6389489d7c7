"""Text: frozen encoders (``att3d.registry.TEXT_ENCODERS``: minilm, mpnet, clip, t5) and prompt sets.

Importing this package is cheap; every module of it is imported when the registry is first used, so a new
encoder module needs no line here.
"""
