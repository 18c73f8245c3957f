"""A request's ``safeguards`` answered: the ``safeguard_results`` of one
reply, a verdict for each of its tool calls. What the judge decides is its
verdict; what it leaves undecided is, by the mode the server runs in,
flagged with the permission rule that would allow it (``policy``) or asked
of the served model (``model``). In ``client`` mode the server declines the
check and Claude Code's own classifier judges every call: Claude Code
2.1.332 takes a per-call "unavailable" or "skipped" as a failed check and
denies the call, and falls back to its classifier only for a session whose
replies carry no results at all."""

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass

from safeguards.judge import judge
from safeguards.policy import FLAGGED, NOT_FLAGGED, Verdict
from safeguards.rules import Context

log = logging.getLogger("pensieve.safeguards")

MODES = ("policy", "model", "client")
DANGEROUS_TOOL_USE = "dangerous_tool_use"
# How long the served model may take over one verdict (--auto-mode-check model).
MODEL_TIMEOUT_S = 30.0
MODEL_MAX_TOKENS = 96
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"outcome": {"type": "string", "enum": [FLAGGED, NOT_FLAGGED]},
                   "explanation": {"type": "string", "maxLength": 240}},
    "required": ["outcome", "explanation"],
    "additionalProperties": False,
}
MODEL_POLICY = """You check one action of a coding agent before it runs, for the user.
Flag it when it could destroy or overwrite data outside the project, discard work that
cannot be restored, expose credentials or keys, send local files or secrets off the
machine, run code fetched from the network, escalate privileges, weaken security
settings, or change the system or remote services beyond ordinary development work.
Do not flag ordinary work: reading, searching and editing inside the project, running
its tests, builds and linters, and routine version control.
Answer in JSON: {"outcome": "flagged" or "not_flagged", "explanation": one sentence}."""


class SafeguardsError(ValueError):
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Requested:
    """One safeguard a request asked for; ``context`` for dangerous_tool_use."""

    type: str
    context: Context | None = None


def parse(value):
    """The ``safeguards`` field of a request: a tuple of Requested."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SafeguardsError("safeguards", "Input should be a list")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise SafeguardsError(f"safeguards.{i}", "Input should be an object with a "
                                                     "string 'type'")
        context = None
        if item["type"] == DANGEROUS_TOOL_USE:
            raw = item.get("classifier_context")
            if raw is not None and not isinstance(raw, dict):
                raise SafeguardsError(f"safeguards.{i}.classifier_context",
                                      "Input should be an object")
            context = Context.from_json(raw or {})
        out.append(Requested(item["type"], context))
    return tuple(out)


class Check:
    """Verdicts for replies, in one of MODES. ``ask(messages, schema,
    max_tokens)`` is a coroutine that returns the served model's text."""

    def __init__(self, mode="policy", ask=None, timeout=MODEL_TIMEOUT_S):
        self.mode, self.ask, self.timeout = mode, ask, timeout

    async def results(self, requested, calls):
        """(safeguard_results, Counter of (outcome, by)) for ``calls``:
        (id, name, input) of each tool_use block of the reply; the results
        are None in client mode (the check is declined)."""
        if self.mode == "client":
            return None, Counter({("declined", "client"): len(calls)})
        out, counts = [], Counter()
        for item in requested:
            if item.type != DANGEROUS_TOOL_USE:
                out.append({"type": item.type, "status": {"type": "unsupported"}})
                continue
            tool_uses = {}
            for call_id, name, tool_input in calls:
                result, by = await self.one(name, tool_input, item.context)
                tool_uses[call_id] = result
                counts[(result["outcome"], by)] += 1
            out.append({"type": DANGEROUS_TOOL_USE,
                        "status": {"type": "available", "tool_uses": tool_uses}})
        return out, counts

    async def one(self, name, tool_input, context):
        """(result JSON, who decided) for one call."""
        verdict = judge(name, tool_input, context)
        if verdict.by != "default" or self.mode == "policy":
            return evaluated(verdict), verdict.by
        answer = await self.model_verdict(name, tool_input, context, verdict)
        return evaluated(answer), answer.by

    async def model_verdict(self, name, tool_input, context, undecided):
        """The served model's verdict, or ``undecided`` (flagged) when it does
        not answer in time or in shape."""
        messages = model_prompt(name, tool_input, context, undecided)
        try:
            text = await asyncio.wait_for(self.ask(messages, VERDICT_SCHEMA,
                                                   MODEL_MAX_TOKENS), self.timeout)
            answer = json.loads(text)
            outcome, explanation = answer["outcome"], " ".join(str(answer["explanation"])
                                                               .split())
            if outcome not in (FLAGGED, NOT_FLAGGED):
                raise ValueError(f"outcome {outcome!r}")
        except asyncio.TimeoutError:
            log.warning("the model gave no verdict on %s within %g s", name, self.timeout)
            return undecided
        except Exception as error:  # noqa: BLE001 - any failure keeps the careful verdict
            log.warning("the model's verdict on %s was unusable: %s", name, error)
            return undecided
        if outcome == FLAGGED and not explanation:
            explanation = undecided.explanation
        return Verdict(outcome, explanation[:240], None, "model")


def evaluated(verdict):
    result = {"type": "evaluated", "outcome": verdict.outcome}
    if verdict.explanation:
        # The CLI shows it as "Reason: {explanation}." with its own full stop.
        result["explanation"] = verdict.explanation.rstrip(".")
    if verdict.rule:
        result["cited_rule"] = {"type": "classifier_context", "path": verdict.rule}
    return result


def model_prompt(name, tool_input, context, undecided):
    """System and user turns for the model's check: the policy, where the
    session works, the user's own notes on it, and the call."""
    facts = [f"Working directory: {context.cwd or 'unknown'}",
             f"Trusted directories: {', '.join(context.trusted) or 'none'}",
             f"Home directory: {context.home or 'unknown'}"]
    if context.environment:
        facts.append("The user's notes on this environment:\n"
                     + "\n".join(f"- {e[:400]}" for e in context.environment[:8]))
    call = json.dumps(tool_input, ensure_ascii=False)
    if len(call) > 4000:
        call = call[:4000] + " …(cut)"
    user = ("\n".join(facts) + f"\n\nThe local rules left this undecided: "
            f"{undecided.explanation}\n\nThe action: tool {name} with input {call}\n\n"
            f"Is it to be flagged?")
    return (("system", MODEL_POLICY), ("user", user))
