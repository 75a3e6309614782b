"""``llmkit export`` (a model for deployment) and ``llmkit plugins`` (what is installed)."""

from __future__ import annotations

import json

import click

from llmkit.cli import friendly_errors, model_option


@click.command(name="export")
@model_option
@click.option("--format", "fmt", required=True, metavar="FORMAT",
              help="onnx, gguf, hf, pt2 (torchscript is an alias), or one a plugin adds.")
@click.option("--out", required=True, type=click.Path(), help="Where to write: a .gguf file, or a folder.")
@click.option("--quantize", default=None, metavar="TYPE",
              help="Weight type where the format has a choice. gguf: f32 (default), f16, bf16, q8_0, q4_0, "
                   "q4_1; hf: f32 (default), f16, bf16.")
@friendly_errors
def export_cmd(model: str, fmt: str, out: str, quantize: str | None) -> None:
    """Write MODEL in another format, for other runtimes.

    \b
    onnx   model.onnx with the KV cache as inputs/outputs, for onnxruntime
    gguf   one file for llama.cpp, Ollama, LM Studio (tokenizer and chat template inside)
    hf     a Hugging Face folder for transformers
    pt2    a torch.export program that runs with torch alone

    A format that cannot hold something about the model refuses, and says what.
    """
    from llmkit.export import export, resolve

    resolve(fmt, quantize)  # an unknown format or type fails now, not after loading the model
    import llmkit

    llm = llmkit.load(model)
    path = export(llm, fmt, out, quantize=quantize)
    click.echo(f"wrote {path}")


def describe_plugins() -> dict:
    """What each loaded plugin registers, by hook kind, plus installed plugins that were not loaded
    (LLMKIT_PLUGINS) and those that failed. Calls each plugin's hooks again with a collecting
    ``register``: hooks only register, so this is cheap and changes nothing."""
    from importlib.metadata import entry_points

    from llmkit import plugins

    pm = plugins.manager()
    eps = {ep.name: ep for ep in entry_points(group="llmkit")}
    kinds = sorted(name for name in vars(pm.hook) if name.startswith("register_"))
    loaded = []
    for name, plugin in pm.list_name_plugin():
        registers: dict[str, list[str]] = {}
        for hook_name in kinds:
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                names: list[str] = []
                try:
                    impl.function(register=lambda n, obj, _names=names: _names.append(str(n)))
                except Exception as exc:  # reported, as the registry does, without stopping the listing
                    names.append(f"<failed: {type(exc).__name__}: {exc}>")
                registers[hook_name[len("register_"):]] = names
        ep = eps.get(name)
        if name == "llmkit.builtins":
            from importlib.metadata import version

            package, ver = "llmkit", version("llmkit")
        elif ep is not None and ep.dist is not None:
            package, ver = ep.dist.name, ep.dist.version
        else:
            package, ver = "", ""
        loaded.append({"name": "builtin" if name == "llmkit.builtins" else name, "package": package,
                       "version": ver, "module": getattr(plugin, "__name__", ""), "registers": registers})
    loaded_names = {n for n, _ in pm.list_name_plugin()}
    failed = [{"name": f.name, "reason": f.reason} for f in plugins.failures()]
    failed_names = {f["name"] for f in failed}
    skipped = sorted(n for n in eps if n not in loaded_names and n not in failed_names)
    return {"plugins": loaded, "not_loaded": skipped, "failed": failed}


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def plugins_cmd(as_json: bool) -> None:
    """List installed plugins and what each registers (commands, architectures, exporters, ...).

    Plugins are packages with an entry point in the `llmkit` group. One that fails to load is
    listed with the reason and does not stop the others. LLMKIT_PLUGINS=a,b loads only those.
    """
    info = describe_plugins()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for plugin in info["plugins"]:
        origin = f"{plugin['package']} {plugin['version']}".strip()
        click.secho(plugin["name"], bold=True, nl=False)
        click.echo(f"  ({origin})" if origin else "")
        if not plugin["registers"]:
            click.echo("  (registers nothing)")
        for kind, names in plugin["registers"].items():
            if names:
                click.echo(f"  {kind}: {', '.join(sorted(names))}")
    for name in info["not_loaded"]:
        click.echo(f"{name}  (installed, not loaded: LLMKIT_PLUGINS does not name it)")
    for failure in info["failed"]:
        click.secho(f"{failure['name']}  failed: {failure['reason']}", fg="red")


COMMANDS = [export_cmd, plugins_cmd]
