"""A refused request keeps the page: previous results stay on screen, a toast says why, and the tab's controls go
back to their last valid values. One mechanism for every tab that scores (Inspect, Compare, Diagnose)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gradio as gr

from rerank_app.pickers import USER_ERRORS, user_message
from rerank_core.progress import Cancelled

__all__ = ["answer_or_keep", "api_endpoint", "page_io", "remembered", "serve"]


def answer_or_keep(run: Callable[[], Sequence[Any]], output_count: int, values: Mapping[str, Any],
                   last_valid: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """run()'s outputs, then the remembered values, then one update per control named in `values` (in its order).

    Answered: the outputs, and `values` join the remembered ones; the controls stay as they are. Refused (a user
    error): no output changes, a toast says why, each control goes back to its remembered value (stays as it is
    when none is remembered). Stopped (Stop, a closed page): no output changes and the toast says how far it got;
    the controls keep the values that were asked for, which were valid.
    """
    try:
        outputs = run()
    except Cancelled as stopped:
        gr.Warning(user_message(stopped), title="Stopped")
        return _unchanged(output_count + 1 + len(values))
    except USER_ERRORS as error:
        gr.Warning(user_message(error), title="Request refused")
        known = last_valid or {}
        restored = [gr.update(value=known[name]) if name in known else gr.skip() for name in values]
        return (*_unchanged(output_count + 1), *restored)
    return (*outputs, {**(last_valid or {}), **values}, *_unchanged(len(values)))


def remembered(controls: Mapping[str, gr.components.Component]) -> gr.State:
    """A tab's last valid control values, starting from the controls' initial values (valid by construction)."""
    return gr.State({name: control.value for name, control in controls.items()})


def page_io(state: gr.State, inputs: Sequence[Any], outputs: Sequence[Any],
            controls: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """A page event's inputs and outputs around answer_or_keep: the handler's, the remembered values (read and
    written), then the controls it may restore."""
    return [*inputs, state], [*outputs, state, *controls]


def api_endpoint(event: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any], api_name: str,
                 **options: Any) -> None:
    """The plain handler under `api_name`, where a refusal raises (what gradio_client expects); on a hidden button
    wired before the page's own events, which are private and answer with answer_or_keep.

    The values reach the handler as the client sent them (preprocess=False): Gradio's own checks (a choice not
    listed, a number past a slider's end, a list for a number) answered without naming the field, where the core's
    checks name it. These components' payloads are the plain values their preprocessing would pass on."""
    gr.Button(visible=False).click(event, inputs, outputs, api_name=api_name, preprocess=False, **options)


def serve(api: Callable[..., Any], page: Callable[..., Any], triggers: Sequence[Callable[..., Any]], state: gr.State,
          inputs: Sequence[Any], outputs: Sequence[Any], controls: Sequence[Any], api_name: str,
          **options: Any) -> None:
    """One action wired twice: `api` for scripts under `api_name`, `page` (an answer_or_keep handler) on each of the
    page's triggers (a button's click, Enter in a box), private."""
    api_endpoint(api, inputs, outputs, api_name, **options)
    page_inputs, page_outputs = page_io(state, inputs, outputs, controls)
    for trigger in triggers:
        trigger(page, page_inputs, page_outputs, api_visibility="private", **options)


def _unchanged(count: int) -> tuple[Any, ...]:
    return tuple(gr.skip() for _ in range(count))
