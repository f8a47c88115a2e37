"""Where a base model comes from (`tiny`, a local folder, the Hub or its local cache), and in one line why a name
cannot be loaded, found without loading anything: no torch here, so the check runs before the heavy imports."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

TINY = "tiny"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "t5-small", "google/flan-t5-large"
FIX = "pass a local model folder (with config.json), a Hub id, or tiny"


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_problem(name: str) -> str | None:
    """Why `name` cannot be loaded as a model, or None where it may load (tiny, a model folder, a Hub id that is
    cached or may be downloaded)."""
    if name == TINY:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"{name}: a folder without config.json, not a model; {FIX}"
    if path.exists():
        return f"{name}: is a file, not a model folder; {FIX}"
    if name.startswith(("/", "./", "../", "~")) or name.endswith("/") or name.count("/") > 1:
        return f"{name}: no such folder; {FIX}"
    if not HUB_ID.match(name):
        return f"{name}: neither a local folder nor a Hub model id; {FIX}"
    if name.lower() == TINY:
        return f"{name}: no such model; did you mean {TINY}?"
    if cached(name):
        return None
    if hub_offline():
        return (f"{name}: not a local folder, and the Hub is off (HF_HUB_OFFLINE is set) with no copy in the local "
                "cache; pass a local model folder or tiny, or unset HF_HUB_OFFLINE to download it")
    return hub_problem(name)


@lru_cache(maxsize=16)  # asked by the pre-check, the tokenizer and the model load: one query a process
def hub_problem(name: str) -> str | None:
    """Ask the Hub once whether it has the model: from_pretrained retries an unreachable Hub for ~50 s (measured)
    and then fails with a traceback."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        return f"{name}: a gated model on the Hub; accept its terms on its page, then log in (hf auth login)"
    except RepositoryNotFoundError:
        return f"{name}: no such model on the Hub (a private one needs you logged in: hf auth login); {FIX}"
    except HfHubHTTPError:
        return None  # the Hub answered; loading says the rest
    except Exception as e:  # no network, no DNS, a proxy: the HTTP client's own error types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return (f"{name}: the Hub cannot be reached ({first}) and no copy is in the local cache; pass a local model "
                "folder or tiny, or check the network (HF_ENDPOINT, proxies)")
    return None


def cached(repo_id: str) -> bool:
    """A copy of the model's config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False



def model_config(name: str) -> dict | None:
    """A model's config.json, read without loading anything (tiny's, a folder's, or a Hub model's cached copy);
    None where there is none to read yet."""
    import json

    if name == TINY:
        path = Path(__file__).with_name("tiny") / "config.json"
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json") if HUB_ID.match(name) else None
        path = Path(found) if isinstance(found, str) else None
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
    except (OSError, ValueError):
        return None
