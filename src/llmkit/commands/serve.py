"""``llmkit serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from llmkit.cli import dtype_option, executor_option, friendly_errors, model_option


@click.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 serves other machines too (set LLMKIT_API_KEY then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="LLMKIT_API_KEY", default=None,
              help="Require this key (Authorization: Bearer KEY) on every route but /health. Prefer setting "
                   "LLMKIT_API_KEY: a key on the command line shows in `ps` to every user of the machine.")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the -m value).")
@click.option("--quantize", type=click.Choice(["none", "q8_0", "q4_0", "q4_k", "int8", "int4"]), default="none",
              show_default=True,
              help="Weight-only quantization at load (CPU): faster decoding, slightly lower quality.")
@executor_option
@dtype_option
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Requests decoded together in one step.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(0, None),
              help="Requests that may wait for a slot; beyond it clients get 429 with Retry-After.")
@click.option("--default-max-tokens", default=512, show_default=True, type=click.IntRange(1, None),
              help="Tokens generated when a request does not say (never past the context).")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may take, waiting included; then it is cancelled.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM/Ctrl-C: seconds that requests in flight get to finish.")
@click.option("--max-body-mb", default=8.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body accepted (413 beyond).")
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="Let browser pages from this origin call the API (CORS); repeatable, * for any. Requests "
                   "from pages on other origins are refused (403).")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Without --api-key, serve requests whose Host header is this name too (besides the bound "
                   "address, loopback names and IP addresses); repeatable, * for any.")
@click.option("--max-request-tokens", default=16384, show_default=True, type=click.IntRange(1, None),
              help="Work one request may ask for, in tokens: n x (prompt + max_tokens), logprob entries, "
                   "texts to embed; 400 beyond.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1, None),
              help="Open connections served at once; more are answered 503.")
@click.option("--body-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client has to send its request body (408 beyond).")
@click.option("--no-prefix-cache", "no_prefix_cache", is_flag=True,
              help="Do not keep earlier prompts' keys and values for reuse (on by default).")
@click.option("--prefix-cache-mb", type=click.IntRange(1, None), default=None,
              help="Memory bound of the prefix cache (default: two whole context windows of the model's keys and "
                   "values, at most a tenth of the memory available, 64-2048 MB).")
@click.option("--no-speculative", "no_speculative", is_flag=True,
              help="Do not speculate by prompt lookup (on by default while few requests decode).")
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH",
              help="Serve a LoRA adapter (a PEFT folder) beside the model; clients pick it with "
                   "\"model\": \"NAME\". Repeatable.")
@click.option("--max-stored-responses", default=256, show_default=True, type=click.IntRange(0, None),
              help="Responses kept for previous_response_id on /v1/responses (the least recently used go "
                   "first; 0 keeps none).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--ray", "on_ray", is_flag=True,
              help="Serve on Ray Serve: replicas of the model behind Ray's proxy, on this machine or a cluster "
                   "(pip install 'llmkit[ray]').")
@click.option("--replicas", type=click.IntRange(1, None), default=None,
              help="With --ray: how many replicas, each with its own engine (default 1).")
@click.option("--min-replicas", type=click.IntRange(0, None), default=None,
              help="With --ray: scale on load between --min-replicas and --max-replicas.")
@click.option("--max-replicas", type=click.IntRange(1, None), default=None,
              help="With --ray: the most replicas when scaling on load.")
@click.option("--threads-per-replica", type=click.IntRange(1, None), default=1, show_default=True,
              help="With --ray: CPUs (and torch threads) each replica takes.")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: start a "
                   "local Ray instance.")
@friendly_errors
def serve(model: str, host: str, port: int, api_key: str | None, served_model_name: str | None, quantize: str,
          executor: str, dtype: str | None, max_batch: int, max_queue: int, default_max_tokens: int,
          request_timeout: float, drain_timeout: float, max_body_mb: float, allow_origins: tuple[str, ...],
          allow_hosts: tuple[str, ...], max_request_tokens: int, max_connections: int, body_timeout: float,
          no_prefix_cache: bool, prefix_cache_mb: int | None, no_speculative: bool, loras: tuple[str, ...],
          max_stored_responses: int, log_level: str, on_ray: bool, replicas: int | None,
          min_replicas: int | None, max_replicas: int | None,
          threads_per_replica: int, address: str | None) -> None:
    """Serve a model over HTTP with an OpenAI-compatible API and a chat page.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /tokenize,
    /detokenize, /health, /ready, /metrics (Prometheus), / (chat page in the browser), /docs (OpenAPI);
    Anthropic's /v1/messages and /v1/messages/count_tokens, OpenAI's /v1/responses, /v1/rerank and
    /v1/score (docs/wire-formats.md).
    Request bodies are JSON with Content-Type: application/json. Set the API key with the
    LLMKIT_API_KEY environment variable rather than --api-key, which other users see in `ps`.
    Many clients are served at once: their requests share each decoding step. The model runs in the
    same default configuration as `llmkit generate` and `llmkit.load` (GGUF files on llmkit's own
    block kernels), with a prefix cache and speculation by prompt lookup unless turned off.

    \b
    With --ray the same app runs as a Ray Serve application: --replicas copies of the model (or
    --min-replicas to --max-replicas, scaled on load), each with --threads-per-replica CPUs, behind
    Ray's proxy on --host/--port; requests go to the less loaded of two replicas, and a replica
    that dies is replaced. /metrics then labels each replica's figures with `replica`.

    \b
    Example:
      llmkit serve -m smollm2-135m-instruct --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi!"}]}'
      llmkit serve -m smollm2-135m-instruct --ray --replicas 2       (two engines, one per core)
    """
    from llmkit import store
    from llmkit.server import ServerConfig, serve as run, serving_executor

    if not on_ray and (replicas or min_replicas is not None or max_replicas is not None or address):
        raise click.UsageError("--replicas, --min-replicas, --max-replicas and --address go with --ray")
    if replicas and (min_replicas is not None or max_replicas is not None):
        raise click.UsageError("give --replicas N for a fixed number, or --min-replicas/--max-replicas to scale")
    if api_key and click.get_current_context().get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        click.secho("warning: --api-key on the command line shows in `ps` to every user of this machine; "
                    "set LLMKIT_API_KEY instead.", fg="yellow", err=True)
    # fail before binding the port, not seconds later in the loading thread
    if not store.is_catalogue_name(model):
        store.resolve(model)
    adapters = {}
    for spec in loras:
        adapter, sep, path = spec.partition("=")
        if not sep or not adapter or not path:
            raise click.BadParameter(f"{spec!r}: give NAME=PATH (a PEFT adapter folder)", param_hint="--lora")
        if not Path(path, "adapter_config.json").exists():
            raise click.BadParameter(f"{path}: no adapter_config.json there (a PEFT LoRA adapter folder)",
                                     param_hint="--lora")
        adapters[adapter] = path
    name = served_model_name or model
    aliases = tuple(a for a in {model, str(model).rstrip("/").rsplit("/", 1)[-1]} if a != name)
    config = ServerConfig(model_name=name, aliases=aliases, api_key=api_key or None, max_batch=max_batch,
                          max_queue=max_queue, default_max_tokens=default_max_tokens,
                          request_timeout=request_timeout, max_body_bytes=int(max_body_mb * 1024 * 1024),
                          drain_timeout=drain_timeout, allow_origins=allow_origins, allow_hosts=allow_hosts,
                          max_request_tokens=max_request_tokens, max_connections=max_connections,
                          body_timeout=body_timeout, host=host, max_stored_responses=max_stored_responses)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.secho(f"warning: serving on {host} without an API key: anyone who can reach this port can use it "
                    "(set LLMKIT_API_KEY).", fg="yellow", err=True)
    executor, dtype = serving_executor(executor, dtype)
    runs_on = f"executor {executor}" + (f", {dtype}" if dtype else "")
    click.echo(f"llmkit: loading {model} ({runs_on}); serving on http://{host}:{port} "
               "(chat page at /, API docs at /docs)", err=True)
    cache: bool | int = False if no_prefix_cache else (prefix_cache_mb * 2**20 if prefix_cache_mb else True)
    if on_ray:
        try:
            from llmkit.server.ray_app import run_on_ray
        except ImportError as exc:
            raise click.UsageError(f"--ray needs Ray Serve: pip install 'llmkit[ray]' ({exc})") from None

        run_on_ray(model, address=address, host=host, port=port, replicas=replicas or 1, min_replicas=min_replicas,
                   max_replicas=max_replicas, threads_per_replica=threads_per_replica, config=config,
                   quantize=quantize, executor=executor, dtype=dtype, prefix_cache=cache,
                   speculative=not no_speculative, adapters=adapters)
        return
    run(model, host=host, port=port, quantize=quantize, executor=executor, dtype=dtype, config=config,
        log_level=log_level, prefix_cache=cache, speculative=not no_speculative, adapters=adapters)


COMMANDS = [serve]
