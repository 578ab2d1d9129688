"""`pagoda` command line. Engine flags are derived from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from pagoda.config import section_fields, section_hints

_SKIP_FOR_ENGINE = {"server_config"}
_SERVER_SECTION = "server_config"


def _flag_type(hint: Any) -> dict[str, Any]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if args and typing.get_origin(hint) is not typing.Literal:  # Optional[X] / X | None
        return _flag_type(args[0])
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float):
        return {"type": hint}
    return {"type": str}


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True, server: bool = False) -> None:
    group = parser.add_argument_group("engine")
    for section, field in section_fields():
        if (section in _SKIP_FOR_ENGINE and not server) or (positional_model and field.name == "model"):
            continue
        kwargs = _flag_type(section_hints(section)[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=argparse.SUPPRESS,
            help=f"(default: {default})",
            **kwargs,
        )
    if positional_model:
        parser.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                            help="local folder, .gguf file, hub id, or alias (default: smollm2-135m)")


def engine_kwargs(args: argparse.Namespace, server: bool = False) -> dict[str, Any]:
    names = {f.name for s, f in section_fields() if server or s not in _SKIP_FOR_ENGINE}
    return {k: v for k, v in vars(args).items() if k in names}


def _cmd_serve(args: argparse.Namespace) -> int:
    from pagoda.config import EngineConfig
    from pagoda.engine.frontend.core_client import EngineClient

    from pagoda.server.access import check_exposure, load_api_keys

    config = EngineConfig.from_kwargs(**engine_kwargs(args, server=True))
    check_exposure(config.server_config, bool(load_api_keys(config.server_config)))  # before the model loads
    client = EngineClient(config)
    client.spawn()  # the core imports torch and loads the model while this process imports the web stack
    from pagoda.server.launch import serve

    return serve(config, log_level=args.log_level, client=client)


def _cmd_chat(args: argparse.Namespace) -> int:
    from pagoda.chat import run_chat

    return run_chat(args, engine_kwargs(args))


def _cmd_generate(args: argparse.Namespace) -> int:
    from pagoda import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    prompt: Any = args.prompt
    if args.chat:
        tok = llm.get_tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
    for output in llm.generate_stream(prompt, params):
        sys.stdout.write("".join(choice.text for choice in output.outputs))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


BENCHMARKS = {  # subcommand -> (module, help); each module has add_arguments(parser) and run(args)
    "serve": ("pagoda.bench.serve", "load an OpenAI-compatible server and measure latency and throughput"),
    "offline": ("pagoda.bench.offline", "in-process engine throughput on a named workload, peers beside it"),
    "latency": ("pagoda.bench.latency", "batch-1 time to first token and decode tokens/s"),
    "backends": ("pagoda.bench.backends", "greedy tokens of the attention backends side by side"),
    "roofline": ("pagoda.bench.roofline", "this machine's bandwidth and FLOP/s and the limits they imply"),
    "startup": ("pagoda.bench.startup", "seconds from launching pagoda serve to a ready /health"),
    "gateway": ("pagoda.bench.gateway", "latency a gateway adds (Pagoda's, LiteLLM's) over an instant upstream"),
    "structured": ("pagoda.bench.structured", "structured outputs: constrained vs unconstrained tok/s, mask cost, "
                                              "compile times, TTFT with a cold and a cached grammar"),
    "quality": ("pagoda.bench.quality", "perplexity and top-1 agreement with fp32 of each quantization mode"),
    "spec": ("pagoda.bench.spec", "speculative decoding on vs off: decode tok/s, TPOT p50/p99, acceptance"),
    "soak": ("pagoda.bench.soak", "many short requests (some cut) with the server's memory sampled; fails on growth"),
}


def _add_bench(sub: Any, with_options: bool) -> None:
    """The bench modules import numpy/httpx/matplotlib helpers: only load them for `pagoda bench ...` so that
    `pagoda serve` starts without them."""
    import importlib

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        if not with_options:
            kinds.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)


def build_parser(with_bench_options: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print a completion of a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen, positional_model=False)
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: the bundled model on 127.0.0.1:8000)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(srv, positional_model=True, server=True)
    srv.set_defaults(func=_cmd_serve)

    chat = sub.add_parser("chat", help="chat in the terminal with a running server (--url) or an in-process engine")
    chat.add_argument("--url", default=None, help="a Pagoda/OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    chat.add_argument("--api-key", dest="chat_api_key", default=None, help="bearer key for --url")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=256)
    add_engine_args(chat, positional_model=False)
    chat.set_defaults(func=_cmd_chat)
    from pagoda.gateway.cli import add_gateway_arguments, add_up_arguments, run_gateway, run_up

    gw = sub.add_parser("gateway", help="one OpenAI endpoint over many upstreams (balancing, affinity, failover)")
    add_gateway_arguments(gw)
    gw.set_defaults(func=run_gateway)
    up = sub.add_parser("up", help="start N local `pagoda serve` replicas and a gateway in front of them")
    add_up_arguments(up)
    up.set_defaults(func=run_up)
    from pagoda.gateway.policy.cli import add_audit_arguments, add_usage_arguments, run_audit, run_usage

    usage = sub.add_parser("usage", help="a gateway's requests, tokens and cost by key, tenant or model")
    add_usage_arguments(usage)
    usage.set_defaults(func=run_usage)
    audit = sub.add_parser("audit", help="the gateway's audit log: verify its hash chain")
    add_audit_arguments(audit)
    audit.set_defaults(func=run_audit)
    from pagoda.quantize.cli import add_arguments as add_quantize_arguments, run as run_quantize

    quant = sub.add_parser("quantize", help="write a GPTQ / AWQ / int8 / int4 checkpoint of a model")
    add_quantize_arguments(quant)
    quant.set_defaults(func=run_quantize)
    _add_bench(sub, with_bench_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_bench_options=bool(argv) and argv[0] == "bench").parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
