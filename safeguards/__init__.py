"""The auto-mode judge: Claude Code's ``safeguards`` (a ``dangerous_tool_use``
check with the session's ``classifier_context``) answered locally. ``judge``
decides one tool call by the user's rules, then the built-in policy
(``policy``), with shell text parsed (``shell``) and paths compared lexically
(``paths``)."""

from safeguards.policy import Verdict, judge
from safeguards.rules import Context

__all__ = ["Context", "Verdict", "judge"]
