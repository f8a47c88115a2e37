"""`peft-t5 serve`: flags -> peft_t5.serve.server.serve (checks, takes the port, loads the base and adapters, serves)."""
from __future__ import annotations

from . import command_parser, parse_adapter_specs, parse_flags


def build_parser():
    parser = command_parser("peft-t5 serve", "Serve adapters on one base over HTTP: POST /v1/generate, GET "
                                             "/v1/adapters, the page at /.")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="An adapter to load at start, by name; repeat for several (none: --model serves alone, "
                             "as 'base', with adapters loaded at run time from --adapter_root)")
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny), or a whole fine-tuned model; default: the one "
                                        "recorded in the first adapter")
    parser.add_argument("--qlora", action="store_true", help="Load the base in 4-bit NF4")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="Allow pickled .bin weights, at start and in run-time loads (they can run code)")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1; others need a key)")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--api_key", help="Require 'Authorization: Bearer KEY' on every route but /health "
                                          "(or set PEFT_T5_API_KEY)")
    parser.add_argument("--adapter_root", help="Load adapters at run time from folders under this one (only): by "
                                               "POST /v1/adapters, or on demand when a request names one")
    parser.add_argument("--max_loaded_adapters", type=int,
                        help="With --adapter_root: adapters held at once; to load another, the least recently used "
                             "one not named at start and not in use is unloaded (default: no bound)")
    parser.add_argument("--quantize", choices=["int8"],
                        help="int8: the base's linear layers in int8, activations quantized per row (CPU, oneDNN)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="The base's weights (default float32); bfloat16 on a GPU or a CPU with AMX or "
                             "AVX512-BF16: half the memory, faster matmuls, answers that differ slightly")
    parser.add_argument("--kv_cache_dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="The attention caches of base and LoRA rows: auto (default) the base's dtype, but "
                             "bfloat16 with --quantize int8 on a CPU (half the memory to stream each step; answers "
                             "that differ slightly); float32 keeps int8's caches exact")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="on (default): the decoder step and the encoder of base and LoRA rows compiled with "
                             "torch.compile, eager until they are; off: eager only, the reference the compiled graphs "
                             "are tested against")
    parser.add_argument("--compile_cache", metavar="DIR",
                        help="Where the compiled graphs' kernels are kept, so that a restart builds none again "
                             "(default: ~/.cache/peft-t5/inductor, or TORCHINDUCTOR_CACHE_DIR)")
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


def parse_args(argv: list[str]) -> dict:
    """serve's keywords from its flags (--adapter NAME=FOLDER, repeated, as {name: folder})."""
    settings = vars(parse_flags(build_parser(), argv))
    settings["adapters"] = parse_adapter_specs(settings.pop("adapter"))
    settings["compile"] = settings["compile"] == "on"
    return settings


def serve_main(argv: list[str]) -> None:
    from ..serve.server import serve

    serve(**parse_args(argv))
