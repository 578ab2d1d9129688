"""Admission limits checked in front of the engine and again inside it, each by one function, so the HTTP
server, the offline ``LLM`` and the engine core refuse the same input with the same words."""

from __future__ import annotations


class AdmissionError(ValueError):
    """The request can never be served (too long for the model or the cache, too many sequences)."""


class ContextLengthError(AdmissionError):
    """The prompt plus the completion asked for do not fit the model's context."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queued_requests``; retry later."""


def check_queue_room(num_waiting: int, num_new: int, limit: int) -> None:
    """The one waiting-queue check (the server before tokenizing the rest, the core on arrival)."""
    if num_new > limit:
        raise AdmissionError(f"this request holds {num_new} sequences (n x prompts), more than the waiting queue "
                             f"ever admits at once (max_queued_requests={limit}); send fewer")
    if num_waiting + num_new > limit:
        raise QueueFullError(f"waiting queue is full ({limit} requests); retry later")


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, what: str = "prompt") -> None:
    """The one context-length check, in OpenAI's words. ``max_tokens=None`` (up to the context) still needs
    room for one generated token."""
    if prompt_len < 1:
        raise AdmissionError(f"the {what} is empty: it must hold at least one token")
    wanted = 1 if max_tokens is None else max_tokens
    if prompt_len + wanted > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the {what}, {wanted} in the completion). Please reduce "
            f"the length of the {what} or the completion."
        )
