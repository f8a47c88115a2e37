"""`peft-t5 serve`: load a base once with every adapter on it and serve them over HTTP (see peft_t5/serve/)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from ..errors import PeftT5Error

KEY_VARIABLE = "PEFT_T5_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-t5 serve", description=(
        "Serve adapters on one base over HTTP: POST /v1/generate, GET /v1/adapters, the page at /."))
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=FOLDER",
                        help="An adapter to load at start, by name; repeat for several")
    parser.add_argument("--base", help="Base model (Hub id, folder, tiny); default: the one recorded in the first adapter")
    parser.add_argument("--qlora", action="store_true", help="Load the base in 4-bit NF4")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="Allow pickled .bin weights, at start and in run-time loads (they can run code)")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1; others need a key)")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--api_key", help=f"Require 'Authorization: Bearer KEY' on every route but /health "
                                          f"(or set {KEY_VARIABLE})")
    parser.add_argument("--adapter_root", help="Load adapters at run time from folders under this one (only): by "
                                               "POST /v1/adapters, or on demand when a request names one")
    parser.add_argument("--max_loaded_adapters", type=int,
                        help="With --adapter_root: adapters held at once; to load another, the least recently used "
                             "one not named at start and not in use is unloaded (default: no bound)")
    parser.add_argument("--quantize", choices=["int8"], help="int8: the base's linear layers in dynamic int8 (CPU)")
    parser.add_argument("--max_rows", type=int, default=64, help="Rows decoding at once (default 64)")
    parser.add_argument("--max_rows_per_request", type=int, default=8,
                        help="Rows of one request decoding at once, so that one large request cannot slow "
                             "the others much (default 8; raise it for a server with one batch client)")
    parser.add_argument("--max_queue_rows", type=int, default=1024,
                        help="Rows waiting for a slot, beyond which requests get 503 (default 1024)")
    parser.add_argument("--request_timeout", type=float, default=300.0,
                        help="Seconds a generation request may take, then 504 (default 300; 0: no limit)")
    parser.add_argument("--max_request_tokens", type=int, default=8192,
                        help="inputs x (beams or samples) x max_new_tokens of one request (default 8192)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="The most tokens a request may ask for an output (default 256)")
    parser.add_argument("--max_inputs", type=int, default=32, help="Inputs in one request (default 32)")
    parser.add_argument("--max_input_chars", type=int, default=20_000,
                        help="Characters in one input (default 20000); with --max_inputs it bounds the request body, "
                             "which is refused (413) from its Content-Length, or as it arrives, before it is buffered")
    parser.add_argument("--read_timeout", type=float, default=30.0,
                        help="Seconds a client has to send a request's head, then again its body; then the connection "
                             "is closed (head) or answered 408 (body) (default 30)")
    parser.add_argument("--limit_concurrency", type=int, default=512,
                        help="Open connections; beyond, requests get 503 (uvicorn's setting; default 512)")
    parser.add_argument("--shutdown_timeout", type=float, default=10.0,
                        help="On SIGTERM or Ctrl-C: waiting requests get 503 at once, rows decoding get this many "
                             "seconds to finish, then the server exits (default 10)")
    parser.add_argument("--rate", metavar="QUESTIONS", help="Questions to rate blind (a jokes CSV/JSON or one a line)")
    parser.add_argument("--rate_systems", help="Comma-separated systems to rate (default: base and every adapter)")
    parser.add_argument("--ratings", default="ratings.db", help="SQLite file for ratings (default ratings.db)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads (which takes a while)."""
    from ..adapters import read_metadata
    from ..serve.ratings import rating_plan
    from . import parse_adapter_specs

    args.api_key = args.api_key or os.environ.get(KEY_VARIABLE) or None
    if not is_loopback(args.host) and not args.api_key:
        raise PeftT5Error(f"--host {args.host}: refusing to serve beyond this machine without a key; "
                          f"pass --api_key KEY (or set {KEY_VARIABLE}), or bind 127.0.0.1")
    if not 0 <= args.port <= 65535:
        raise PeftT5Error(f"--port {args.port}: not a port number (0 to 65535)")
    for name in ("max_inputs", "max_input_chars", "max_rows", "max_rows_per_request", "max_queue_rows",
                 "max_request_tokens", "max_new_tokens", "limit_concurrency"):
        if getattr(args, name) < 1:
            raise PeftT5Error(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("read_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise PeftT5Error(f"--{name} {getattr(args, name)}: must be more than 0 seconds")
    if args.request_timeout < 0:
        raise PeftT5Error(f"--request_timeout {args.request_timeout}: must be 0 (no limit) or more seconds")
    if args.quantize and args.qlora:
        raise PeftT5Error("--quantize int8 and --qlora both quantize the base; pick one")
    args.adapters = parse_adapter_specs(args.adapter)
    metadata = {}
    for name, path in args.adapters.items():
        if not Path(path).is_dir():
            raise PeftT5Error(f"--adapter {name}={path}: no such folder; pass the folder that train_lora.py wrote")
        metadata[name] = read_metadata(path, args.trust_pickle)
    if args.adapter_root and not Path(args.adapter_root).is_dir():
        raise PeftT5Error(f"--adapter_root {args.adapter_root}: no such folder")
    if args.max_loaded_adapters is not None and args.max_loaded_adapters < 1:
        raise PeftT5Error(f"--max_loaded_adapters {args.max_loaded_adapters}: must be at least 1")
    if args.rate and not Path(args.rate).is_file():
        raise PeftT5Error(f"--rate {args.rate}: no such file; pass a jokes CSV/JSON or a text file, one question a line")
    args.rate_systems = [s.strip() for s in args.rate_systems.split(",") if s.strip()] if args.rate_systems else []
    unknown = [s for s in args.rate_systems if s != "base" and s not in args.adapters]
    if unknown:
        raise PeftT5Error(f"--rate_systems: {', '.join(unknown)} not loaded; choose from base, {', '.join(args.adapters)}")
    if args.rate:
        rating_plan(metadata, args.rate_systems)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a port in use is said at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PeftT5Error(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pass another --port, or "
                          "stop the program that holds it")
    sock.listen(2048)  # connections made once "serving ... on" is printed wait for uvicorn instead of being refused
    return sock


def serve_main(argv: list[str]) -> None:
    args = parse_args(argv)
    check_args(args)
    listening = bind(args.host, args.port)
    # Marked absent, these are not imported: transformers and PEFT import bitsandbytes whenever it is installed (2 s
    # and 43 MB here; only --qlora's 4-bit base needs it), T5's modelling imports scipy for object-detection losses
    # and accelerate imports boto3 for SageMaker (1.2 s and 45 MB; a server needs neither)
    for unused in ("scipy", "boto3", *(() if args.qlora else ("bitsandbytes",))):
        sys.modules.setdefault(unused, None)

    from ..bank import AdapterBank
    from ..compare import read_questions
    from ..serve.app import ServeSettings, create_app, make_server

    questions = read_questions(args.rate) if args.rate else []
    if args.rate and not questions:
        raise PeftT5Error(f"--rate {args.rate}: no questions in it")
    from ..serve.engine import model_thread_threads

    threads = model_thread_threads()
    bank = AdapterBank.load(args.base, args.adapters, qlora=args.qlora, trust_pickle=args.trust_pickle)
    if args.quantize:
        from ..quantize import quantize_int8

        quantize_int8(*bank.models())
    settings = ServeSettings(api_key=args.api_key, adapter_root=args.adapter_root,
                             max_loaded_adapters=args.max_loaded_adapters, max_inputs=args.max_inputs,
                             max_input_chars=args.max_input_chars, read_timeout=args.read_timeout,
                             limit_concurrency=args.limit_concurrency, shutdown_timeout=args.shutdown_timeout,
                             max_rows=args.max_rows, max_queue_rows=args.max_queue_rows,
                             max_rows_per_request=args.max_rows_per_request, threads=threads,
                             request_timeout=args.request_timeout or None, max_request_tokens=args.max_request_tokens,
                             max_new_tokens=args.max_new_tokens,
                             rate_questions=questions, rate_systems=args.rate_systems,
                             ratings=args.ratings if args.rate else None, trust_pickle=args.trust_pickle)
    app = create_app(bank, settings)
    port = listening.getsockname()[1]
    print(f"serving {', '.join(bank.names)} on http://{args.host}:{port}/ "
          f"({'API key required' if args.api_key else 'no API key: loopback only'})", flush=True)
    make_server(app).run(sockets=[listening])
