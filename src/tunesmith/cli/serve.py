"""`tunesmith serve`: an OpenAI-compatible HTTP server over one base model and its named LoRA/DoRA adapters."""

from __future__ import annotations

from tunesmith.cli.inference import add_model_args
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect


def register(sub) -> dict:
    s = sub.add_parser("serve", help="serve the base and its adapters over an OpenAI-compatible HTTP API")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--adapter-dir", default=None, metavar="DIR", type=PathArg(Expect.FOLDER),
                   help="allow POST /v1/adapters to hot-load adapters from inside DIR (off without it)")
    s.add_argument("--base-name", default="base", help="the model id requests use for the bare base model")
    s.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--context", type=int, default=None,
                   help="prompt + completion token limit (default: the model's max_position_embeddings)")
    s.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond this get 429")
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together, one forward pass per step for all of them (default 8)")
    return {"serve": cmd_serve}


def build_app(args):
    from tunesmith.infer.adapters import load_with_adapter, parse_adapter_args
    from tunesmith.methods.base import adapter_base
    from tunesmith.serve.app import Limits, create_app
    from tunesmith.serve.errors import ApiError
    from tunesmith.serve.registry import Registry

    if args.max_batch < 1:
        from tunesmith.errors import ConfigError

        raise ConfigError(f"--max-batch {args.max_batch}: expected at least 1 (the requests decoded together)")
    adapters = parse_adapter_args(args.adapter)
    model, tokenizer = load_with_adapter(adapter_base(adapters, args.model), None, args.dtype, args.trust_remote_code,
                                         device=args.device)
    registry = Registry(model, tokenizer, args.base_name, args.adapter_dir)
    for name, path in adapters.items():
        try:
            registry.load(name, path, check_dir=False)
        except ApiError as e:
            from tunesmith.errors import ConfigError

            raise ConfigError(f"--adapter {name}={path}: {e.message}") from None
    context = args.context or getattr(model.config, "max_position_embeddings", 2048)
    return create_app(registry, Limits(context, args.max_tokens_cap, min(128, args.max_tokens_cap)), args.api_key,
                      args.queue_size, args.max_batch)


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="info")
    return 0
