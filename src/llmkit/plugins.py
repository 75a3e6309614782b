"""The plugin system: pluggy hook specifications and the registries built from them.

Every extension point is a hook named ``register_<kind>`` that receives a ``register`` callback.
Built-in pieces register through the same hooks as third-party packages (see ``llmkit._builtins``),
so a plugin can add to or replace anything llmkit ships. Adding an extension point is one
function in ``Specs`` below; ``registry(kind)`` then works for it with no other change.

Third-party plugins are packages exposing an entry point in the ``llmkit`` group. They are
imported on first use of a registry, never at ``import llmkit`` time, so that a command that
needs no plugin does not pay for loading them all. ``LLMKIT_PLUGINS`` names a comma-separated
subset of entry points to load; set to an empty string it loads none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("llmkit")
hookimpl = pluggy.HookimplMarker("llmkit")


class Specs:
    """Hook specifications. Each receives ``register(name, obj)``."""

    @hookspec
    def register_architectures(self, register: Callable[[str, Any], None]) -> None:
        """Register model architectures: ``register(name, Architecture(...))``.

        ``name`` is the architecture's key as checkpoints spell it (HF ``model_type`` or GGUF
        ``general.architecture``). See ``llmkit.formats.Architecture`` for what one provides.
        """

    @hookspec
    def register_sources(self, register: Callable[[str, Any], None]) -> None:
        """Register model sources for ``llmkit pull``: ``register(scheme, Source(...))``.

        ``scheme`` is the prefix before the colon in a source string (``pypi:``, ``hf:``).
        See ``llmkit.store.Source`` for the interface.
        """

    @hookspec
    def register_commands(self, register: Callable[[str, Any], None]) -> None:
        """Register CLI commands: ``register(name, click_command)``; ``llmkit NAME`` runs it."""

    @hookspec
    def register_tasks(self, register: Callable[[str, Any], None]) -> None:
        """Register tasks: ``register(name, llmkit.tasks.Task(...))``: a prompt template plus a decoding
        rule; ``llm.run_task(name, ...)`` and ``llmkit run NAME`` run it, ``llmkit tasks`` lists it."""

    @hookspec
    def register_metrics(self, register: Callable[[str, Any], None]) -> None:
        """Register evaluation metrics: ``register(name, llmkit.evaluate.Metric(...))``;
        ``llmkit eval --task NAME`` computes it."""

    @hookspec
    def register_exporters(self, register: Callable[[str, Any], None]) -> None:
        """Register export formats for ``llmkit export --format NAME``: ``register(name, Exporter(...))``.

        See ``llmkit.export.Exporter``: ``run(model, tokenizer, out: Path, quantize: str | None)
        -> Path`` writes the export and returns where; ``quantize`` lists the accepted values.
        """

    @hookspec
    def register_cleaners(self, register: Callable[[str, Any], None]) -> None:
        """Register data-cleaning steps for training data: ``register(name, step)``.

        ``step(text: str) -> str | None`` returns the cleaned document, or None to drop it. Steps
        must be pure functions of the text (deterministic, no state between documents), so that
        preparing the same data twice gives the same result.
        """

    @hookspec
    def register_middleware(self, register: Callable[[str, Any], None]) -> None:
        """Register server middleware: ``register(name, middleware)``; the server calls every one, in
        registration order.

        ``middleware.on_request(body: dict) -> dict`` receives a generation request's JSON body
        (chat, completions; OpenAI shape: ``messages`` or ``prompt``) before the model sees it and
        returns the body to use (a changed copy, or the same dict). ``middleware.on_response(body:
        dict) -> dict`` receives every response body before it is sent (``choices`` with
        ``message`` or ``text``, logprobs and tool calls; embeddings, tokenize, detokenize). For a
        streamed answer it receives, per choice, a chunk whose ``delta.content`` (or ``text``),
        ``logprobs`` and ``tool_calls`` hold the whole answer so far, and the client gets what is
        new in what it returns; the last words wait until the next ones come. Either method may
        be absent. Raising ``llmkit.LLMKitError`` refuses the request with HTTP 400 and the
        error's message (a moderation filter's way to say no).
        """

    @hookspec
    def register_routes(self, register: Callable[[str, Any], None]) -> None:
        """Register extra HTTP routes on the server: ``register(name, route)``.

        ``route`` has ``method`` ("GET", "POST", ...), ``path`` ("/v1/redact") and
        ``handler(body: dict) -> dict``: the parsed JSON body in (empty for GET), a JSON-able dict
        out, sent with status 200. Any object with those attributes works (a dataclass, a
        ``types.SimpleNamespace``), so a plugin needs no web framework. Built-in paths win over
        a plugin's route with the same method and path.
        """


@dataclass
class PluginFailure:
    name: str
    reason: str


@dataclass
class _State:
    manager: pluggy.PluginManager | None = None
    registries: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)


_state = _State()


def _selected() -> set[str] | None:
    """The entry-point plugins LLMKIT_PLUGINS names (comma-separated), or None: all of them."""
    raw = os.environ.get("LLMKIT_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def manager() -> pluggy.PluginManager:
    """The plugin manager, created (and entry points loaded) on first call."""
    if _state.manager is not None:
        return _state.manager
    pm = pluggy.PluginManager("llmkit")
    pm.add_hookspecs(Specs)
    from llmkit import _builtins

    pm.register(_builtins, name="llmkit.builtins")
    eps = list(entry_points(group="llmkit"))
    wanted = _selected()
    for ep in eps:
        if wanted is not None and ep.name not in wanted:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            _state.failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))
    _state.manager = pm
    return pm


def registry(kind: str) -> dict[str, Any]:
    """Everything registered through the ``register_<kind>`` hook, by name.

    Plugins registered later override earlier ones with the same name: the built-ins come
    first, so a third-party plugin can replace any of them.
    """
    if kind in _state.registries:
        return _state.registries[kind]
    hook = getattr(manager().hook, f"register_{kind}", None)
    if hook is None:
        raise KeyError(f"no plugin hook register_{kind}")
    calls: list[list[tuple[str, Any]]] = []

    for impl in hook.get_hookimpls():  # in registration order
        items: list[tuple[str, Any]] = []
        try:
            impl.function(register=lambda name, obj, _items=items: _items.append((name, obj)))
        except Exception as exc:  # keep what it registered before failing; report the rest
            _state.failures.append(PluginFailure(impl.plugin_name, f"{type(exc).__name__}: {exc}"))
        calls.append(items)
    result: dict[str, Any] = {}
    for items in calls:
        for name, obj in items:
            result[name] = obj
    _state.registries[kind] = result
    return result


def failures() -> list[PluginFailure]:
    """Plugins that failed to load or to register, with the reason."""
    manager()
    return list(_state.failures)


def reset() -> None:
    """Forget the manager and registries (for tests that install or select plugins)."""
    _state.manager = None
    _state.registries.clear()
    _state.failures.clear()
