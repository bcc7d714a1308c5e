"""The application's settings, as Pydantic models: declared and validated in one place.

``AppArgs`` is the argument of the application builder ``serving.app:build_app``: Ray Serve
validates a serve config's ``args:`` into it (its typed application builders), and
``skipserve serve`` builds it from its flags. It is validated once, in the builder's caller,
and the deployment receives the validated object.

``LiveSettings``, the fields of ``AppArgs`` that may change while a replica runs, is the schema
of the deployment's ``user_config``, which Ray Serve hands to ``GatedModelServer.reconfigure``.
An ``AppArgs`` value of one of these fields is what a replica starts with; a ``user_config``
value replaces it, and a field a ``user_config`` leaves out keeps its current value.

Both refuse unknown fields; ``SettingsError`` names every field that is wrong. Imports no Ray.
"""
import os
from functools import cached_property
from typing import Any, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gating.policies import POLICIES
from serving.images import Limits


class SettingsError(ValueError):
    """Settings that failed validation; the message names each wrong field and what is wrong with it."""


def model_name_for(checkpoint: str) -> str:
    """The name a checkpoint is served under when none is given: a shipped name as it is, a path's
    file name without its extension."""
    from gating.zoo import ZOO

    return checkpoint if checkpoint in ZOO else os.path.splitext(os.path.basename(checkpoint))[0]


def _problems(err: ValidationError, model: type[BaseModel]) -> str:
    """One line naming each wrong field of ``model`` and what is wrong with it."""
    out = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            out.append(f"{where}: unknown field (known: {', '.join(sorted(model.model_fields))})")
        elif e["type"] == "value_error":  # a validator's own message, which shows the value
            out.append(f"{where}: {e['ctx']['error']}")
        elif where:
            out.append(f"{where}: {e['msg']}, got {e['input']!r}")
        else:
            out.append(f"expected a mapping of field names to values, got {e['input']!r}")
    return "; ".join(out)


class LiveSettings(BaseModel):
    """The settings a running replica can change: the deployment's ``user_config``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(32, ge=1, description="images per executed batch; a request with more "
                                                      "is split into batches of this size")
    batch_wait_ms: float = Field(5.0, ge=0, allow_inf_nan=False,
                                 description="how long a batch waits to fill, in milliseconds")
    policy: Optional[str] = Field(None, description="the decision rule (gating.policies) served to requests "
                                                    "that name none; unset: the checkpoint's own")
    knob: Optional[float] = Field(None, allow_inf_nan=False,
                                  description="the knob (alpha) of that rule; unset: the rule's default. Checked "
                                              "against the model when the replica applies it")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES.names())}")
        return name

    @classmethod
    def from_user_config(cls, user_config: Optional[Mapping[str, Any]]) -> "LiveSettings":
        """A ``user_config`` validated; ``model_fields_set`` holds the fields it sets.

        Strict: a ``user_config`` comes typed from YAML or JSON, so a string or a bool where a
        number belongs is a mistake, not something to convert."""
        try:
            return cls.model_validate({} if user_config is None else user_config, strict=True)
        except ValidationError as err:
            raise SettingsError(f"invalid user_config: {_problems(err, cls)}") from None


class AppArgs(LiveSettings, Limits):
    """The application builder's arguments: what a replica loads, how it batches and queues, the SLO
    autopilot, and the request limits (``Limits``' fields, flat, as in the serve config's ``args``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field("default", min_length=1,
                            description="a shipped model's name or a checkpoint path, resolved on the replica")
    model_name: str = Field("", description="the model's name in the v2 routes and the metrics; empty: derived "
                                            "from the checkpoint (see model_name_for)")
    threads: int = Field(0, ge=0, description="torch threads per replica; 0: the CPUs Ray reserved for it")
    max_queued_images: int = Field(256, ge=1, description="images waiting in one replica beyond which a request "
                                                          "is answered 503 at once")
    model_process: bool = Field(True, description="run the model in a child process with a GIL of its own "
                                                  "(serving.model_process)")
    slo_p99_ms: float = Field(0.0, ge=0, allow_inf_nan=False,
                              description="the SLO autopilot's p99 latency target in milliseconds; 0: off")
    min_budget: float = Field(0.3, gt=0, le=1, description="the autopilot's hard floor, a fraction of the "
                                                           "backbone's FLOPs")
    max_accuracy_drop: float = Field(1.0, ge=0, le=100, allow_inf_nan=False,
                                     description="the autopilot's accuracy budget: it serves no cap whose validation "
                                                 "top-1 (the checkpoint's cap curve) is more than this many "
                                                 "percentage points under the model's own")

    @model_validator(mode="before")
    @classmethod
    def _name_from_checkpoint(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and not data.get("model_name"):
            checkpoint = data.get("checkpoint", "default")
            if isinstance(checkpoint, str) and checkpoint:
                data = {**data, "model_name": model_name_for(checkpoint)}
        return data

    @classmethod
    def parse(cls, args: Union["AppArgs", Mapping[str, Any]]) -> "AppArgs":
        """``args`` validated (an ``AppArgs`` is returned as it is). Lax, as Ray Serve validates a
        config's ``args``: ``"32"`` is 32 and ``"false"`` is False, as command-line values are."""
        if isinstance(args, cls):
            return args
        try:
            return cls.model_validate(dict(args) if isinstance(args, Mapping) else args)
        except ValidationError as err:
            raise SettingsError(f"invalid application args: {_problems(err, cls)}") from None

    @cached_property
    def limits(self) -> Limits:
        """The request limits among these args (validated with them)."""
        return Limits.model_construct(**{name: getattr(self, name) for name in Limits.model_fields})
