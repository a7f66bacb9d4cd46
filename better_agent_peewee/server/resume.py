"""A run's input checked against its thread's interrupts, and the run config it stores."""
from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional

from .problems import Problem
from .routes import open_interrupts

__all__ = ["check_resume", "run_config"]

#: The body fields Better Agent keeps in a run's ``config`` (a resumed run takes the rest from
#: the interrupted run's).
_CONFIG_FIELDS = ("context", "toolChoice", "providerOptions", "maxSteps")


def _invalid(detail: str) -> Problem:
    return Problem("VALIDATION_FAILED", detail)


def check_resume(body: Dict[str, Any], thread_id: Optional[str], latest: Optional[Dict[str, Any]],
                 messages: List[Any]) -> Optional[List[Any]]:
    """The body's ``resume`` entries, checked as Better Agent checks them (422 problems).

    Without ``resume``, a thread whose latest run waits on interrupts refuses a new run.
    """
    interrupts = open_interrupts(latest)
    resume = body.get("resume")
    if resume is None:
        if interrupts:
            raise _invalid("This thread has pending interrupts. Provide resume input to continue.")
        return None
    if messages:
        raise _invalid("Resume input must not include messages.")
    if not thread_id:
        raise _invalid("Resume input requires threadId.")
    if latest is None:
        raise _invalid(f"No latest run found for thread '{thread_id}'.")
    if latest.get("status") != "interrupted" or not interrupts:
        raise _invalid("Latest run is not interrupted.")
    if not isinstance(resume, list) or not resume:
        raise _invalid("Resume input must not be empty.")
    _check_entries(resume, interrupts)
    return resume


def _check_entries(resume: List[Any], interrupts: List[Any]) -> None:
    by_id = {i.get("id"): i for i in interrupts if isinstance(i, dict)}
    seen = set()
    for entry in resume:
        entry_id = entry.get("interruptId") if isinstance(entry, dict) else None
        if entry_id not in by_id:
            raise _invalid(f"Resume entry '{entry_id}' does not match an open interrupt.")
        if entry_id in seen:
            raise _invalid(f"Resume entry '{entry_id}' is duplicated.")
        if entry.get("status") == "cancelled" and entry.get("payload") is not None:
            raise _invalid(f"Cancelled resume entry '{entry_id}' must not include payload.")
        if _expired(by_id[entry_id].get("expiresAt")):
            raise _invalid(f"Interrupt '{entry_id}' has expired and can no longer be resumed.")
        seen.add(entry_id)
    if len(seen) != len(by_id):
        raise _invalid("Resume input must address all open interrupts from the interrupted run.")


def _expired(expires_at: Any) -> bool:
    if not isinstance(expires_at, str) or not expires_at:
        return False
    try:
        moment = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return False  # (Date.parse gives NaN: never expired)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return datetime.datetime.now(datetime.timezone.utc) > moment


def run_config(body: Dict[str, Any], latest: Optional[Dict[str, Any]],
               resume: Optional[List[Any]]) -> Dict[str, Any]:
    """The run's ``config``: the body's context, toolChoice, providerOptions and maxSteps (a
    resumed run takes missing ones from the interrupted run), plus ``resume``."""
    stored = (latest or {}).get("config") if resume is not None else None
    stored = stored if isinstance(stored, dict) else {}
    config = {key: body[key] if body.get(key) is not None else stored.get(key) for key in _CONFIG_FIELDS}
    config = {key: value for key, value in config.items() if value is not None}
    if resume is not None:
        config["resume"] = resume
    return config
