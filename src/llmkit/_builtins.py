"""llmkit's own pieces, registered through the same hooks a third-party plugin uses."""

from importlib import import_module

from llmkit.plugins import hookimpl

# modules under llmkit.commands whose COMMANDS list joins the CLI
COMMAND_MODULES = [
]


@hookimpl
def register_architectures(register):
    from llmkit.formats.archs import BUILTIN_ARCHITECTURES

    for name, arch in BUILTIN_ARCHITECTURES.items():
        register(name, arch)


@hookimpl
def register_sources(register):
    from llmkit.store import builtin_sources

    for scheme, source in builtin_sources().items():
        register(scheme, source)


@hookimpl
def register_commands(register):
    for module in COMMAND_MODULES:
        for command in import_module(f"llmkit.commands.{module}").COMMANDS:
            register(command.name, command)
