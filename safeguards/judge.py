"""The auto-mode judge: one tool call, in the session's context, to a verdict.

A call is first taken apart into its effects (a command run, a file read,
written or deleted, a host fetched from or sent to, a tool called); shell
text through ``effects``. Each effect is decided by the user's rules first
(deny, auto-mode hard deny, ask, auto-mode soft deny: flagged, citing the
rule; then allow rules: not flagged), else by the built-in policy
(``policy``). The call is flagged if any effect is; not flagged if every
effect is allowed or known to be safe; otherwise undecided, which is flagged
with the permission rule that would allow it (``by="default"``)."""

from safeguards import rules as R
from safeguards.effects import ShellEffects
from safeguards.paths import BELOW, UNKNOWN, inside
from safeguards.policy import (ALLOWED, FLAGGED, NOT_FLAGGED, POLICY_FLAG, RULE_FLAG, SAFE,
                               SESSION_TOOLS, UNDECIDED, Effect, Verdict, fetch_effect,
                               path_effect)
from safeguards.shell import ShellError


def judge(name, tool_input, context):
    """The verdict on one call ``name(tool_input)`` in ``context``."""
    if not isinstance(name, str) or not name:
        return Verdict(FLAGGED, "The call names no tool, so it cannot be checked.",
                       by="default")
    try:
        effects = effects_of(name, tool_input if isinstance(tool_input, dict) else {},
                             context)
    except (ShellError, RecursionError) as error:
        return Verdict(FLAGGED, f"The server could not follow this shell text ({error}); "
                                f"to let it run, add a rule such as `Bash(...)` to "
                                f"permissions.allow.", by="default")
    findings = [_decide(effect, context) for effect in effects]
    level, why, rule, effect = min(findings, key=lambda f: f[0])
    if level == RULE_FLAG:
        return Verdict(FLAGGED, why, rule, "rule")
    if level == POLICY_FLAG:
        return Verdict(FLAGGED, f"{_subject(effect)} {why}.", by="policy")
    if level == UNDECIDED:
        return Verdict(FLAGGED, f"{_subject(effect)} {why}, so the server does not pass it; "
                                f"to let it run, add `{effect.allow_hint}` to "
                                f"permissions.allow.", by="default")
    cited = [f for f in findings if f[0] == ALLOWED]
    if cited:
        return Verdict(NOT_FLAGGED, "", cited[0][2], "rule")
    return Verdict(NOT_FLAGGED, "", None, "policy")


def _subject(effect):
    if effect.tool == "Bash" and effect.kind == "run":
        return f"`{_clip(effect.target)}`"
    if effect.tool == "Bash":
        return f"`{_clip(effect.detail)}`" if effect.detail else "This command"
    return f"This {effect.tool} call"


def _clip(text, limit=80):
    text = " ".join((text or "").replace(UNKNOWN, "…").replace(BELOW, "…").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- rules first -----------------------------------------------------------------

FLAG_LISTS = (("deny", "the user's deny rule"),
              ("auto_hard_deny", "the auto-mode hard-deny rule"),
              ("ask", "the user's ask rule"),
              ("auto_soft_deny", "the auto-mode soft-deny rule"))


def _decide(effect, context):
    """(level, explanation, cited rule path, effect) for one effect."""
    for name, reason in FLAG_LISTS:
        for rule in context.rules.get(name, ()):
            if _matches(rule, effect, context, stopping=True):
                asked = ", and the server cannot ask on the user's behalf" \
                    if name == "ask" else ""
                named = f' "{rule.name}"' if rule.name else ""
                return (RULE_FLAG, f"{_subject(effect)} is covered by {reason}{named} "
                                   f"`{rule.text}` ({rule.path}){asked}.", rule.path, effect)
    for name in ("allow", "auto_allow"):
        for rule in context.rules.get(name, ()):
            if _matches(rule, effect, context, stopping=False):
                return (ALLOWED, "", rule.path, effect)
    return (effect.level, effect.why, None, effect)


def _matches(rule, effect, context, stopping):
    """Whether ``rule`` covers ``effect``. Path and domain rules reach into
    shell text only to stop a call (``stopping``): a deny rule for Read
    also stops `cat`, an allow rule for Read does not allow `cat`."""
    if rule.kind == "command":
        return effect.kind == "run" and R.matches_prose_command(rule, effect.target or "")
    if rule.kind == "path":
        path = context.resolve(rule.spec)
        return effect.kind in ("read", "write", "delete") and path is not None \
            and inside(effect.target, path, context.fold_case)
    tool = rule.tool
    if tool == "Bash":
        return effect.kind == "run" and R.matches_command(rule, effect.target or "")
    if tool in R.FAMILIES or tool in R.READ_TOOLS:
        if effect.kind not in ("read", "write", "delete"):
            return False
        family = R.FAMILIES.get(tool, (tool,))
        if effect.shell:
            # Only a rule with a pattern names files to protect from other
            # tools; a bare "Edit" rule (say, the CLI's --tools narrowing)
            # is about that tool alone.
            if not stopping or rule.spec in (None, ""):
                return False
            if R.EFFECT_FAMILY[effect.kind] not in (tool, "Edit" if tool == "Write" else tool):
                return False
        elif effect.tool not in family:
            return False
        return R.matches_path(rule, effect.target, context)
    if tool == "WebFetch":
        if effect.kind not in ("fetch", "send") or (effect.shell and not stopping):
            return False
        return R.matches_domain(rule, effect.target)
    if effect.kind != "call":
        return False
    if tool in ("Agent", "Task") and rule.spec not in (None, "", "*"):
        return effect.target in ("Agent", "Task") and effect.detail == rule.spec
    return R.matches_tool(rule, effect.target)


# === Effects of a call ==========================================================


def effects_of(name, data, context):
    if name in ("Bash", "Monitor") and ("command" in data or name == "Bash"):
        command = data.get("command")
        if not isinstance(command, str) or not command.strip():
            return [Effect("run", "", UNDECIDED, "has no command to check")]
        return ShellEffects(context).of(command)
    if name in ("Read", "NotebookRead") + R.EDIT_TOOLS and not _first_string(
            data, "file_path", "notebook_path"):
        return [Effect("call", name, UNDECIDED, "names no file", name, False)]
    if name in R.READ_TOOLS:
        path = _first_string(data, "file_path", "notebook_path", "path") or context.cwd
        pattern = data.get("pattern") if name == "Glob" else None
        if isinstance(pattern, str) and pattern.startswith(("/", "~")):
            path = pattern.split("*", 1)[0].rsplit("/", 1)[0] or "/"
        return [path_effect("read", context.resolve(path), context, name)]
    if name in R.EDIT_TOOLS:
        path = _first_string(data, "file_path", "notebook_path")
        return [path_effect("write", context.resolve(path) if path else None, context, name)]
    if name == "WebFetch":
        return [fetch_effect(data.get("url"), context)]
    if name in SESSION_TOOLS:
        detail = data.get("subagent_type") if isinstance(data.get("subagent_type"), str) \
            else None
        return [Effect("call", name, SAFE, SESSION_TOOLS[name], name, False, detail)]
    return [Effect("call", name, UNDECIDED, "calls a tool whose effects the server does "
                                            "not know", name, False)]


def _first_string(data, *keys):
    return next((data[k] for k in keys if isinstance(data.get(k), str) and data[k]), None)
