"""Start a server: check its settings (before the model loads, which takes a while), take the port, load the base
once with every adapter on it, and serve over HTTP until stopped.

    from peft_t5.serve.server import serve
    serve({"jokes": "adapters/jokes"}, port=8000)           # as `peft-t5 serve --adapter jokes=adapters/jokes`
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from ..errors import PeftT5Error

KEY_VARIABLE = "PEFT_T5_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(s: dict) -> None:
    """Everything that can be checked before the model loads. `s`: serve's keywords; api_key and rate_systems are
    completed (the key from the environment, the systems as a list)."""
    from ..adapters import read_metadata
    from .ratings import rating_plan

    s["api_key"] = s["api_key"] or os.environ.get(KEY_VARIABLE) or None
    if not is_loopback(s["host"]) and not s["api_key"]:
        raise PeftT5Error(f"--host {s['host']}: refusing to serve beyond this machine without a key; "
                          f"pass --api_key KEY (or set {KEY_VARIABLE}), or bind 127.0.0.1")
    if not 0 <= s["port"] <= 65535:
        raise PeftT5Error(f"--port {s['port']}: not a port number (0 to 65535)")
    for name in ("max_inputs", "max_input_chars", "max_rows", "max_rows_per_request", "max_queue_rows",
                 "max_request_tokens", "max_new_tokens", "limit_concurrency"):
        if s[name] < 1:
            raise PeftT5Error(f"--{name} {s[name]}: must be at least 1")
    for name in ("read_timeout", "shutdown_timeout"):
        if not s[name] > 0:
            raise PeftT5Error(f"--{name} {s[name]}: must be more than 0 seconds")
    if s["request_timeout"] < 0:
        raise PeftT5Error(f"--request_timeout {s['request_timeout']}: must be 0 (no limit) or more seconds")
    if s["quantize"] not in (None, "int8"):
        raise PeftT5Error(f"--quantize {s['quantize']}: the one quantization is int8")
    if s["quantize"] and s["qlora"]:
        raise PeftT5Error("--quantize int8 and --qlora both quantize the base; pick one")
    if s["dtype"] not in ("float32", "bfloat16"):
        raise PeftT5Error(f"--dtype {s['dtype']}: the dtypes are float32 and bfloat16")
    if s["dtype"] == "bfloat16" and (s["quantize"] or s["qlora"]):
        raise PeftT5Error(f"--dtype bfloat16 and --{'quantize int8' if s['quantize'] else 'qlora'} both set the "
                          "base's weights; pick one")
    if s["dtype"] == "bfloat16":
        from ..modeling import bf16_supported

        if not bf16_supported():
            raise PeftT5Error("--dtype bfloat16: this machine has no fast bfloat16 (a GPU with it, or a CPU with AMX "
                              "or AVX512-BF16), where it would be slower than float32; serve in float32 or with "
                              "--quantize int8")
    if s["kv_cache_dtype"] not in ("auto", "float32", "bfloat16"):
        raise PeftT5Error(f"--kv_cache_dtype {s['kv_cache_dtype']}: auto, float32 or bfloat16")
    if s["compile_cache"] and Path(s["compile_cache"]).exists() and not Path(s["compile_cache"]).is_dir():
        raise PeftT5Error(f"--compile_cache {s['compile_cache']}: not a folder; pass a folder (made if missing)")
    if not s["adapters"] and not s["model"]:
        raise PeftT5Error("pass --adapter NAME=FOLDER (repeat for several), or --model for a model served alone")
    metadata = {}
    for name, path in s["adapters"].items():
        if not Path(path).is_dir():
            raise PeftT5Error(f"--adapter {name}={path}: no such folder; pass the folder that train_lora.py wrote")
        metadata[name] = read_metadata(path, s["trust_pickle"])
    if s["adapter_root"] and not Path(s["adapter_root"]).is_dir():
        raise PeftT5Error(f"--adapter_root {s['adapter_root']}: no such folder")
    if s["max_loaded_adapters"] is not None and s["max_loaded_adapters"] < 1:
        raise PeftT5Error(f"--max_loaded_adapters {s['max_loaded_adapters']}: must be at least 1")
    if s["rate"] and not Path(s["rate"]).is_file():
        raise PeftT5Error(f"--rate {s['rate']}: no such file; pass a jokes CSV/JSON or a text file, one question a line")
    systems = s["rate_systems"]
    if isinstance(systems, str):
        systems = [name.strip() for name in systems.split(",") if name.strip()]
    s["rate_systems"] = list(systems or [])
    unknown = [name for name in s["rate_systems"] if name != "base" and name not in s["adapters"]]
    if unknown:
        raise PeftT5Error(f"--rate_systems: {', '.join(unknown)} not loaded; choose from base, "
                          f"{', '.join(s['adapters'])}")
    if s["rate"]:
        rating_plan(metadata, s["rate_systems"])


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


def serve(adapters: dict[str, str], model: str | None = None, qlora: bool = False, trust_pickle: bool = False,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, adapter_root: str | None = None,
          max_loaded_adapters: int | None = None, quantize: str | None = None, max_rows: int = 64,
          max_rows_per_request: int = 8, max_queue_rows: int = 1024, request_timeout: float = 300.0,
          max_request_tokens: int = 8192, max_new_tokens: int = 256, max_inputs: int = 32,
          max_input_chars: int = 20_000, read_timeout: float = 30.0, limit_concurrency: int = 512,
          shutdown_timeout: float = 10.0, rate: str | None = None, rate_systems: str | list[str] | None = None,
          ratings: str = "ratings.db", dtype: str = "float32", compile: bool = True,
          compile_cache: str | None = None, kv_cache_dtype: str = "auto") -> None:
    """Serve `adapters` ({name: folder}) on one base until SIGTERM or Ctrl-C. The keywords are serve's flags."""
    s = dict(locals())
    check_settings(s)
    listening = bind(host, port)
    # Marked absent, these are not imported: transformers and PEFT import bitsandbytes whenever it is installed (2 s
    # and 43 MB here; only --qlora's 4-bit base needs it), T5's modelling imports scipy for object-detection losses
    # and accelerate imports boto3 for SageMaker (1.2 s and 45 MB; a server needs neither)
    for unused in ("scipy", "boto3", *(() if qlora else ("bitsandbytes",))):
        sys.modules.setdefault(unused, None)

    from ..bank import AdapterBank
    from ..compare import read_questions
    from .app import ServeSettings, create_app, make_server
    from .engine import model_thread_threads

    questions = read_questions(rate) if rate else []
    if rate and not questions:
        raise PeftT5Error(f"--rate {rate}: no questions in it")
    threads = model_thread_threads()
    bank = AdapterBank.load(model, adapters, qlora=qlora, trust_pickle=trust_pickle, dtype=dtype)
    if quantize:
        from ..quantize import quantize_int8

        quantize_int8(*bank.models())
    if compile and not compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        compile_cache = str(Path.home() / ".cache" / "peft-t5" / "inductor")
    settings = ServeSettings(api_key=s["api_key"], adapter_root=adapter_root, max_loaded_adapters=max_loaded_adapters,
                             max_inputs=max_inputs, max_input_chars=max_input_chars, read_timeout=read_timeout,
                             limit_concurrency=limit_concurrency, shutdown_timeout=shutdown_timeout,
                             max_rows=max_rows, max_queue_rows=max_queue_rows,
                             max_rows_per_request=max_rows_per_request, threads=threads,
                             request_timeout=request_timeout or None, max_request_tokens=max_request_tokens,
                             max_new_tokens=max_new_tokens, rate_questions=questions,
                             rate_systems=s["rate_systems"], ratings=ratings if rate else None,
                             trust_pickle=trust_pickle, compile=compile, compile_cache=compile_cache,
                             kv_cache_dtype=kv_cache_dtype)
    app = create_app(bank, settings)
    bound = listening.getsockname()[1]
    described = app.state.engine.describe()
    kept = (f" (kernels kept in {os.environ['TORCHINDUCTOR_CACHE_DIR']})"  # compile_cache's folder for this CPU
            if app.state.engine.compiled is not None else "")
    int8 = f", {described['int8']}" if described["int8"] != "off" else ""
    print(f"decoder step {described['step']}{kept}; weights {described['weights']}{int8}; attention caches "
          f"{described['kv_cache']}; kernels "
          f"{described['kernels']}", flush=True)
    print(f"serving {', '.join(bank.names)} on http://{host}:{bound}/ "
          f"({'API key required' if s['api_key'] else 'no API key: loopback only'})", flush=True)
    make_server(app).run(sockets=[listening])
