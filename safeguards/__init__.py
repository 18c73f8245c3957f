"""The auto-mode judge: Claude Code's ``safeguards`` (a ``dangerous_tool_use``
check with the session's ``classifier_context``) answered locally. ``judge``
decides one tool call by the user's rules (``rules``), then the built-in
policy (``policy``), with shell text parsed (``shell``), walked to the
commands it runs (``walk``) and read as effects (``effects``), and paths
compared lexically (``paths``); ``check`` answers a reply's calls."""

from safeguards.judge import judge
from safeguards.policy import Verdict
from safeguards.rules import Context

__all__ = ["Context", "Verdict", "judge"]
