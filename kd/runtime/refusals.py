"""Requests a teacher will not answer because of the request itself: they become rejections, not stage failures.

A prompt longer than the teacher's context, or one a server refuses (invalid request, content filter) or answers
far beyond what was asked (`oversized_answer`), says
nothing about the other records; the stage rejects that record with the reason and the server's words and goes
on. Failures that are about the teacher (bad key, unknown model, a server down after retries) still stop it.

A refusal comes back through `generate`'s callback as a response whose `finish_reason` is the reason and whose
`error` is the message. It is never cached: `too_long` costs one tokenisation to recompute (local) or one
rejected request (server), and recomputing it keeps a rerun's dataset byte-identical while letting a longer
context or a changed server policy take effect.
"""

from __future__ import annotations

from typing import Any, Literal

# oversized_answer: a server's answer far beyond the request's `max_tokens` (kd.runtime.openai): not kept, not
# cached, asked again next run; a server that does it to every request fails no stage, it rejects every record.
Reason = Literal["too_long", "refused_by_server", "oversized_answer"]
REASONS: tuple[Reason, ...] = ("too_long", "refused_by_server", "oversized_answer")
MAX_ERROR_CHARS = 500  # of a server's error text kept in rejected.jsonl


def refused(reason: Reason, message: str) -> dict[str, Any]:
    """The response standing for a request the teacher would not answer (no text, no tokens paid)."""
    return {"text": "", "finish_reason": reason, "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "error": message}


def is_refused(response: dict[str, Any]) -> bool:
    return response.get("finish_reason") in REASONS
