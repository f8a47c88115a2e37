"""What an adapter folder's two JSON files may hold, checked when the folder is read: well-formed JSON with a wrong
type (a template that is a number, a negative rank) is refused in one line naming the file, the field and the fix,
instead of loading and failing later inside PEFT, a route or a template."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import PeftT5Error
from .tasks import get_task, task_names, template_fields

Count = Annotated[StrictInt, Field(ge=1)]
Number = Union[StrictInt, StrictFloat]


class AdapterMetadata(BaseModel):
    """peft_t5.json: the fields peft-t5 reads back (the rest is a record of the run and may hold anything)."""
    model_config = ConfigDict(extra="allow")
    task: Optional[StrictStr] = None
    base_model: Optional[StrictStr] = None
    template: Optional[StrictStr] = None
    truncate_field: Optional[StrictStr] = None
    max_source_length: Optional[Count] = None
    max_target_length: Optional[Count] = None
    qlora: Optional[StrictBool] = None
    head: Optional[Literal["lm", "span"]] = None  # span: an extractive adapter (T5ForQuestionAnswering)
    doc_stride: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    max_answer_length: Optional[Count] = None
    na_threshold: Optional[Number] = None  # a no-answer probability (0-1), or for a span head a logit margin
    metrics: Optional[dict[str, Any]] = None

    @field_validator("na_threshold")
    @classmethod
    def threshold_of_its_kind(cls, threshold, info: ValidationInfo):
        if threshold is not None and info.data.get("head") != "span" and not 0 <= threshold <= 1:
            raise ValueError(f"{threshold} is a no-answer probability: it must be from 0 to 1")
        return threshold

    @field_validator("task")
    @classmethod
    def known_task(cls, task):
        if task is not None and task not in task_names():
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(task_names())}")
        return task

    @field_validator("template")
    @classmethod
    def fields_the_task_fills(cls, template, info: ValidationInfo):
        if template is None:
            return template
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:  # an unmatched brace
            raise ValueError(f"not a prompt template ({e})")
        if not fields or not all(f.isidentifier() for f in fields):
            raise ValueError(f"{template!r} names no field to fill, or a field that is not a name (write {{question}})")
        task = info.data.get("task")  # checked first (declared first); absent where it was wrong
        fills = template_fields(get_task(task).template) if task else fields
        extra = [f for f in fields if f not in fills]
        if extra:
            raise ValueError(f"{template!r} needs {', '.join(extra)}, which task {task!r} does not fill (it fills "
                             f"{', '.join(fills)})")
        return template


class AdapterConfig(BaseModel):
    """adapter_config.json: the fields whose type PEFT trusts (a rank of -1 fails deep inside its layers)."""
    model_config = ConfigDict(extra="allow")
    peft_type: StrictStr
    r: Optional[Count] = None
    lora_alpha: Optional[Annotated[Number, Field(gt=0)]] = None
    lora_dropout: Optional[Annotated[Number, Field(ge=0, lt=1)]] = None
    target_modules: Optional[Union[StrictStr, list[StrictStr]]] = None
    num_virtual_tokens: Optional[Count] = None
    init_r: Optional[Count] = None
    target_r: Optional[Count] = None
    layers_to_transform: Optional[Union[StrictInt, list[StrictInt]]] = None


def checked(schema: type[BaseModel], data: Any, path: Path) -> dict:
    """data as read from `path`, or a PeftT5Error naming the file, the first wrong field and the fix."""
    try:
        schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "the file"
        message = first["msg"].removeprefix("Value error, ")
        raise PeftT5Error(f"{path}: {field}: {message}; restore the file train_lora.py wrote, or correct that field")
    return data


def check_metadata(data: Any, path: Path) -> dict:
    return checked(AdapterMetadata, data, path)


def check_adapter_config(data: Any, path: Path) -> dict:
    return checked(AdapterConfig, data, path)
