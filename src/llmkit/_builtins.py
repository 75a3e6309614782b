"""llmkit's own pieces, registered through the same hooks a third-party plugin uses."""

from llmkit.plugins import hookimpl


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
