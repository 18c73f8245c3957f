"""The session as Claude Code describes it in ``classifier_context``: where
it works (the working and trusted directories, the home), and the user's
rules, matched the way Claude Code matches them: permission rules
(``Bash(npm test:*)``, ``Read(~/.ssh/**)``, ``WebFetch(domain:x)``,
``mcp__server__tool``) and the auto-mode lists, whose prose is matched by
what can be read mechanically in it (rule expressions and backticked
commands or paths)."""

import functools
import re
from dataclasses import dataclass, field, replace

from safeguards.paths import UNKNOWN, inside, resolve

# Tools a path rule of one name covers (Claude Code's families).
READ_TOOLS = ("Read", "Grep", "Glob", "LS", "NotebookRead")
EDIT_TOOLS = ("Edit", "Write", "MultiEdit", "NotebookEdit")
FAMILIES = {"Read": READ_TOOLS, "Edit": EDIT_TOOLS, "Write": EDIT_TOOLS}
# Where a shell's effects meet a path rule: a deny rule for Read also stops
# `cat`, one for Edit also stops `>` and `rm` (routing around a rule by
# switching tools).
EFFECT_FAMILY = {"read": "Read", "write": "Edit", "delete": "Edit"}
SCRATCH = ("/tmp", "/var/tmp", "/private/tmp", "/private/var/folders", "/var/folders",
           "/dev/shm")

RULE_EXPRESSION = re.compile(r"\b(Bash|Read|Edit|Write|WebFetch|Grep|Glob|mcp__[\w-]+)"
                             r"(?:\(([^()]*)\))?")
BACKTICKED = re.compile(r"`([^`\n]{2,200})`")


@dataclass(frozen=True)
class Rule:
    """One rule: ``path`` is where the context holds it (``rules.deny.0``,
    ``auto_mode.soft_deny.2``), ``text`` what the user wrote."""

    path: str
    text: str
    tool: str | None  # None: a bare command prefix or path from prose
    spec: str | None
    root: str | None = None  # the directory "/x" patterns start from
    kind: str = "rule"  # rule, command (a prose backtick), path (a prose backtick)
    name: str | None = None  # an auto-mode entry's name (its text up to ": ")


def parse_rule(text, path, root=None):
    text = text.strip()
    match = re.fullmatch(r"([\w*-]+)(?:\((.*)\))?", text, re.S)
    if not match:
        return None
    return Rule(path, text, match.group(1), match.group(2), root)


def prose_rules(entry, path):
    """The rules an auto-mode entry spells out: rule expressions anywhere
    in it, and backticked commands and paths."""
    out, seen = [], set()
    name = re.split(r":(?=\s|$)", entry.strip().splitlines()[0] if entry.strip() else "")[0]
    name = name.strip()[:120] or None
    for match in RULE_EXPRESSION.finditer(entry):
        if match.group(1).startswith("mcp__") or match.group(2) is not None:
            rule = parse_rule(match.group(0), path)
            if rule and rule.text not in seen:
                seen.add(rule.text)
                out.append(replace(rule, name=name))
    for match in BACKTICKED.finditer(entry):
        text = match.group(1).strip()
        if text in seen or RULE_EXPRESSION.fullmatch(text):
            continue
        seen.add(text)
        if text.startswith(("/", "~", "./")):
            kind = "path"
        elif re.fullmatch(r"[\w.+-]+", text.split()[0]):
            kind = "command"
        else:
            continue  # quoted text that names no command (a marker, a sentence)
        out.append(Rule(path, text, None, text, None, kind, name))
    return out


@dataclass(frozen=True)
class Context:
    """What the judge knows of the session."""

    cwd: str | None
    home: str | None
    trusted: tuple  # absolute directories the session works in
    block_reads: bool = False  # reads outside the trusted directories are blocked
    fold_case: bool = False
    rules: dict = field(default_factory=dict)  # list name -> tuple of Rule
    environment: tuple = ()  # the user's own words about the setting (auto_mode)
    default_branch: str | None = None

    @classmethod
    def from_json(cls, data):
        """From a ``classifier_context``; missing or odd fields are taken as
        the most careful value (nothing trusted, no rules)."""
        data = data if isinstance(data, dict) else {}
        dirs = _dict(data.get("trusted_directories"))
        trusted = []
        primary = _dict(dirs.get("primary"))
        for entry in [primary] + [_dict(e) for e in _list(dirs.get("additional"))]:
            for path in [entry.get("path")] + _list(entry.get("resolved")):
                if isinstance(path, str) and path.startswith("/"):
                    trusted.append(resolve(path, None, None))
        cwd = data.get("live_cwd") if isinstance(data.get("live_cwd"), str) else None
        if cwd is None and isinstance(primary.get("path"), str):
            cwd = primary["path"]
        home = data.get("home_dir") if isinstance(data.get("home_dir"), str) else None
        rules = _dict(data.get("rules"))
        auto = _dict(data.get("auto_mode"))
        lists = {}
        for name in ("deny", "ask", "allow"):
            lists[name] = tuple(
                rule for i, entry in enumerate(_list(rules.get(name)))
                if (rule := _permission_rule(entry, f"rules.{name}.{i}", cwd)) is not None)
        for name in ("hard_deny", "soft_deny", "allow"):
            lists["auto_" + name] = tuple(
                rule for i, entry in enumerate(_list(auto.get(name))) if isinstance(entry, str)
                for rule in prose_rules(entry, f"auto_mode.{name}.{i}"))
        git = _dict(data.get("git_state"))
        return cls(cwd=resolve(cwd, None, None) if cwd and cwd.startswith("/") else None,
                   home=home if home and home.startswith("/") else None,
                   trusted=tuple(dict.fromkeys(p for p in trusted if p)),
                   block_reads=dirs.get("block_reads_outside_working_directories") is True,
                   fold_case=data.get("case_insensitive_paths") is True,
                   rules=lists,
                   environment=tuple(e for e in _list(auto.get("environment"))
                                     if isinstance(e, str)),
                   default_branch=git.get("default_branch")
                   if isinstance(git.get("default_branch"), str) else None)

    def in_trusted(self, path):
        return any(inside(path, root, self.fold_case) for root in self.trusted)

    def in_scratch(self, path):
        """Below a temporary directory, and not in the user's home (which
        may itself sit under one)."""
        if self.home and inside(path, self.home, self.fold_case):
            return False
        return any(inside(path, root, self.fold_case) and path != root for root in SCRATCH)

    def resolve(self, path, cwd=None):
        return resolve(path, cwd or self.cwd, self.home)


def _dict(value):
    return value if isinstance(value, dict) else {}


def _list(value):
    return value if isinstance(value, list) else []


def _permission_rule(entry, path, cwd):
    if isinstance(entry, str):
        entry = {"rule": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("rule"), str):
        return None
    root = entry.get("root") if isinstance(entry.get("root"), str) else cwd
    return parse_rule(entry["rule"], path, root)


# === Matching ===================================================================


def matches_command(rule, text):
    """A Bash rule's specifier against one simple command's text: ``x:*``
    a prefix ending at a word boundary, ``*`` a wildcard, else exact."""
    spec = rule.spec
    if spec is None or spec in ("", "*", ":*"):
        return True
    text = " ".join(text.split())
    if spec.endswith(":*"):
        prefix = " ".join(spec[:-2].split())
        return text == prefix or text.startswith(prefix + " ")
    if "*" in spec:
        pattern = re.escape(" ".join(spec.split())).replace(r"\*", ".*")
        # "ls *" also matches a bare "ls", as a prefix with arguments does.
        pattern = re.sub(r"\\ \.\*$", r"( .*)?", pattern)
        return re.fullmatch(pattern, text, re.S) is not None
    return text == " ".join(spec.split())


def matches_prose_command(rule, text):
    """A backticked command from prose: its words start the command."""
    words, quoted = text.split(), rule.spec.split()
    return bool(quoted) and words[:len(quoted)] == quoted


def matches_path(rule, path, context):
    """A gitignore-style path pattern against a resolved path (or any of
    the directories holding it)."""
    spec = rule.spec
    if spec is None or spec in ("", "*", "**"):
        return True
    if path is None or UNKNOWN in path:
        return False
    if spec.startswith("//"):
        pattern = spec[1:]
    elif spec == "~" or spec.startswith("~/"):
        if not context.home:
            return False
        pattern = context.home + spec[1:]
    elif spec.startswith("/"):
        pattern = (rule.root or context.cwd or "").rstrip("/") + spec
    else:
        base = (context.cwd or "").rstrip("/")
        spec = spec[2:] if spec.startswith("./") else spec
        # No slash inside: a name matched at any depth, as in .gitignore.
        pattern = base + ("/**/" if "/" not in spec.rstrip("/") else "/") + spec
    pattern = pattern.rstrip("/") or "/"
    if pattern.endswith("/**"):  # the directory's contents: the directory too
        pattern = pattern[:-3] + "{/**}"
    regex = _glob_regex(pattern, context.fold_case)
    probe = path
    while True:
        if regex.fullmatch(probe):
            return True
        if probe in ("/", ""):
            return False
        probe = probe.rsplit("/", 1)[0] or "/"


@functools.lru_cache(maxsize=4096)
def _glob_regex(pattern, fold_case):
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("{/**}", i):
            out.append("(?:/.*)?")
            i += 5
        elif pattern.startswith("/**/", i):
            out.append("(?:/.*)?/")
            i += 4
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.I if fold_case else 0)


def matches_domain(rule, host):
    spec = rule.spec or ""
    if not spec.startswith("domain:"):
        return spec in ("", "*")
    domain = spec[len("domain:"):].lower().lstrip("*.")
    host = (host or "").lower()
    return host == domain or host.endswith("." + domain)


def matches_tool(rule, name):
    """A rule naming a whole tool (``Bash``, ``mcp__server``, ``mcp__s__*``)."""
    if rule.tool is None:
        return False
    if rule.tool.startswith("mcp__") and rule.spec is None:
        server = rule.tool
        if server.endswith("__*"):
            server = server[:-3]
        if rule.tool.count("__") == 1 or rule.tool.endswith("__*"):
            return name == server or name.startswith(server + "__")
        return name == rule.tool
    return rule.tool == name and rule.spec in (None, "", "*")
