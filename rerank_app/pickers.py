"""The Inspect tab's pickers as one input set, and the one wrapper that turns a module-level handler into an event."""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import gradio as gr

from rerank_app.context import AppContext
from rerank_core.data.item_text import item_text_choices
from rerank_core.inspector import BASE, InspectSettings
from rerank_core.prompts import get_preset

__all__ = ["NO_ADAPTER_LABEL", "USER_ERRORS", "PickerControls", "Pickers", "adapter_choices", "catalogue_key",
           "endpoint", "make_settings", "refresh_pickers", "text_field_choices", "user_message"]

log = logging.getLogger("rerank_app")

NO_ADAPTER_LABEL = "none (base model)"
# Exceptions that mean "this request cannot be served as asked": shown to the user, the app keeps serving.
USER_ERRORS = (ValueError, LookupError, OSError, RuntimeError)


def user_message(error: BaseException) -> str:
    """The text a refused request shows: a KeyError's message without the repr quotes."""
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error)


# The pickers start at the core's defaults: one declaration, in InspectSettings and CandidateConfig.
_DEFAULT = InspectSettings()


@dataclass(frozen=True)
class Pickers:
    """The picker values every scoring handler takes (Inspect, Compare, Diagnose); named as the API names them."""

    dataset: str = ""
    model: str = ""
    split: str = _DEFAULT.split
    source: str = _DEFAULT.candidates.source
    preset: str = _DEFAULT.preset.name  # a name: resolved once, in settings()
    strategy: str = _DEFAULT.strategy
    text_field: str = _DEFAULT.text_field
    count: int = _DEFAULT.candidates.count
    seed: int = _DEFAULT.candidates.seed
    use_adapter_preset: bool = _DEFAULT.use_adapter_preset
    template_kwargs: str = _DEFAULT.template_kwargs  # chat-template options as a JSON object; '' for none

    def settings(self) -> InspectSettings:
        """The one place the pickers become InspectSettings; the core makes 20.0 an int and refuses an empty or
        1.5 seed."""
        candidates = replace(_DEFAULT.candidates, source=self.source, count=self.count, seed=self.seed)
        return replace(_DEFAULT, split=self.split, preset=get_preset(self.preset), strategy=self.strategy,
                       text_field=self.text_field, candidates=candidates,
                       use_adapter_preset=bool(self.use_adapter_preset), template_kwargs=self.template_kwargs or "")

    def or_first(self, context: AppContext) -> Pickers:
        """Blank dataset or model: the first one the app offers (the JSON API's defaults)."""
        return Pickers(**{**self.__dict__, "dataset": self.dataset or context.datasets.names[0],
                          "model": self.model or context.models.names[0]})


def make_settings(**pickers: Any) -> InspectSettings:
    """InspectSettings from picker values by name, the rest at their defaults (tests and benchmarks)."""
    return Pickers(**pickers).settings()


PICKER_NAMES = tuple(field.name for field in fields(Pickers))
_PICKER_TYPES = typing.get_type_hints(Pickers)


@dataclass
class PickerControls:
    """The Inspect tab's components, which Compare, Fine-tune and Diagnose read too."""

    dataset: gr.Dropdown
    model: gr.Dropdown
    split: gr.Radio
    source: gr.Dropdown
    preset: gr.Dropdown
    strategy: gr.Dropdown
    text_field: gr.Dropdown
    count: gr.Slider
    seed: gr.Number
    use_adapter_preset: gr.Checkbox
    template_kwargs: gr.Textbox
    adapter: gr.Dropdown
    user: gr.Dropdown
    order: gr.Radio
    report_button: gr.Button
    report_file: gr.File
    own_model: Any = None  # own_model.OwnModelControls: the reference and template fields beside the model picker

    @property
    def pickers(self) -> list[gr.components.Component]:
        """The components behind Pickers, in its field order (the order endpoint() expects them)."""
        return [getattr(self, name) for name in PICKER_NAMES]


def catalogue_key(context: AppContext, model: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """What the pickers list: the datasets, the model's adapters and the models (another page may add one). A change
    means the pickers are stale."""
    return tuple(context.datasets.names), tuple(context.models.adapter_names(model)), tuple(context.models.names)


def refresh_pickers(context: AppContext, model: str, last: Any) -> tuple[Any, ...]:
    """New choices for every dataset and adapter picker when datasets or adapters changed (an upload, a
    fine-tune, the CLI, another page); nothing is sent otherwise. Outputs: single-adapter pickers (2),
    multi-adapter pickers (2), dataset pickers (2), the model picker, then the key."""
    key = catalogue_key(context, model)
    if key == last:
        return (gr.skip(),) * 7 + (last,)
    single = gr.Dropdown(choices=adapter_choices(context, model))
    multi = gr.Dropdown(choices=context.models.adapter_names(model))
    datasets = gr.Dropdown(choices=context.datasets.names)
    return single, single, multi, multi, datasets, datasets, gr.Dropdown(choices=context.models.names), key


def text_field_choices(context: AppContext, dataset: str) -> Any:
    """The item-text pickers' offers for a dataset (the named texts, its own fields, a spec with all of them); any
    other spec may be typed, the core checks it. A dataset name not (yet) registered changes nothing."""
    if dataset not in context.datasets.names:
        return gr.skip()
    return gr.Dropdown(choices=item_text_choices(context.datasets.get(dataset).dataset.item_fields))


def adapter_choices(context: AppContext, model: str) -> list[tuple[str, str]]:
    """A single-adapter picker's choices: the base model first, under a label that says so."""
    return [(NO_ADAPTER_LABEL, BASE), *((name, name) for name in context.models.adapter_names(model))]


def endpoint(handler: Callable[..., Any], context: AppContext) -> Callable[..., Any]:
    """handler(context, ..., pickers, ...) as a Gradio event function: the context bound, the pickers spelled out as
    named parameters (what the API shows), and a core error shown as a toast naming the fix instead of a crash."""
    hints = typing.get_type_hints(handler)
    own = list(inspect.signature(handler).parameters.values())[1:]
    public_parameters: list[inspect.Parameter] = []
    for parameter in own:
        parameter = parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:  # Gradio passes every input by position
            parameter = parameter.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if parameter.name != "pickers":
            public_parameters.append(parameter)
            continue
        # With a default Pickers (the JSON API), each picker keeps its default; without, each is required.
        defaults = parameter.default if isinstance(parameter.default, Pickers) else None
        public_parameters += [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_PICKER_TYPES[name],
                              default=inspect.Parameter.empty if defaults is None else getattr(defaults, name))
            for name in PICKER_NAMES]
    public = inspect.Signature(public_parameters, return_annotation=hints.get("return", inspect.Signature.empty))

    @functools.wraps(handler)
    def event(*args: Any, **kwargs: Any) -> Any:
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        positional: list[Any] = []
        keywords: dict[str, Any] = {}
        for parameter in own:
            if parameter.name == "pickers":
                positional.append(Pickers(**{name: bound.arguments[name] for name in PICKER_NAMES}))
                continue
            value = bound.arguments[parameter.name]
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(value)
            elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
                keywords.update(value)
            elif parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                keywords[parameter.name] = value
            else:
                positional.append(value)
        try:
            return handler(context, *positional, **keywords)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            message = user_message(error)
            log.info("request refused: %s", message)
            raise gr.Error(message, print_exception=False) from error

    event.__signature__ = public  # type: ignore[attr-defined]
    event.__annotations__ = {parameter.name: parameter.annotation for parameter in public_parameters
                             if parameter.annotation is not inspect.Parameter.empty}
    if public.return_annotation is not inspect.Signature.empty:
        event.__annotations__["return"] = public.return_annotation
    return event
