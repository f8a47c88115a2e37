import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test: -n 2) the cores are shared out between the workers, before torch is imported here
# or in the processes tests start: two workers whose OpenMP teams each want every core make each other's small ops
# several times slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(scope="session")
def tokenizer():
    from peft_t5.modeling import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_model():
    from peft_t5.modeling import tiny_model as build

    return build()


@pytest.fixture
def squad_record():
    context = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France."
    return {"id": "q1", "title": "Normans", "question": "In what country is Normandy located?", "context": context,
            "answers": ["France"], "answer_starts": [context.index("France")]}


def pytest_collection_modifyitems(config, items):
    """The modules with the most slow tests run first (their order inside kept): make test hands whole modules to
    two workers, and a long module handed out last runs alone at the end while the other worker idles."""
    slow = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + (item.get_closest_marker("slow") is not None)
    first_seen = {name: i for i, name in reversed(list(enumerate(item.module.__name__ for item in items)))}
    items.sort(key=lambda item: (-slow[item.module.__name__], first_seen[item.module.__name__]))
