import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
