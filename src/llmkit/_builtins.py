"""llmkit's own pieces, registered through the same hooks a third-party plugin uses."""

from importlib import import_module

from llmkit.plugins import hookimpl

# modules under llmkit.commands whose COMMANDS list joins the CLI
COMMAND_MODULES = [
    "serve",
    "bench",
    "train",
    "export",
    "explain",
    "tasks",
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
    # one broken module must not hide the others' commands: register what imports, then report
    errors = []
    for module in COMMAND_MODULES:
        try:
            commands = import_module(f"llmkit.commands.{module}").COMMANDS
        except Exception as exc:
            errors.append(f"llmkit.commands.{module}: {type(exc).__name__}: {exc}")
            continue
        for command in commands:
            register(command.name, command)
    if errors:
        raise ImportError("; ".join(errors))


@hookimpl
def register_exporters(register):
    from llmkit.export import builtin_exporters

    for name, exporter in builtin_exporters().items():
        register(name, exporter)


@hookimpl
def register_cleaners(register):
    from llmkit.train import clean

    register("html", clean.html_to_text)
    register("normalize", clean.normalize)


@hookimpl
def register_tasks(register):
    from llmkit.tasks import BUILTIN_TASKS

    for name, task in BUILTIN_TASKS.items():
        register(name, task)


@hookimpl
def register_metrics(register):
    from llmkit.evaluate import BUILTIN_METRICS

    for name, metric in BUILTIN_METRICS.items():
        register(name, metric)
