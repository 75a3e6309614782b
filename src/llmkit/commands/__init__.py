"""CLI commands beyond the core ones in ``llmkit.cli``, one module per area.

Each module defines ``COMMANDS``: a list of click commands. ``llmkit._builtins`` registers them
through the ``register_commands`` hook, the same hook a third-party plugin uses. Keep module-level
imports light (click only): heavy imports belong inside the command functions.
"""
