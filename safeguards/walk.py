"""Shell text as the commands it may run, for the auto-mode judge: the tree
``safeguards.shell`` parses is walked symbolically. Variables the text sets
and ``for`` lists are followed, ``cd`` moves the working directory (where it
may fail, both places stay possible), and the commands other commands run are
opened up (``bash -c``, ``eval``, ``xargs``, ``find -exec``/``-delete``,
``env``, ``sudo``, ``timeout``, ``uv run``, ...). Nothing is run.
``commands(text, cwd, home)`` lists every simple command the text may run,
in order; text the walk cannot know is ``paths.UNKNOWN``."""

import itertools
from dataclasses import dataclass, replace

from safeguards.paths import BELOW, UNKNOWN, resolve
from safeguards.shell import MAX_DEPTH, ShellError, parse, parse_tokens

MAX_COMMANDS = 5000  # simple commands walked for one text
MAX_VALUES = 16  # possible values kept for one word
SHELLS = {"bash", "sh", "zsh", "dash", "ksh", "mksh", "ash", "busybox"}


@dataclass(frozen=True)
class Word:
    values: tuple  # the strings it may expand to; each may hold UNKNOWN
    glob: bool = False  # unquoted * ? [...]: a pattern over paths
    subs: tuple = ()  # the commands of the substitutions inside it

    @property
    def text(self):
        """Its one value, or None when it may be several or holds UNKNOWN."""
        if len(self.values) == 1 and UNKNOWN not in self.values[0]:
            return self.values[0]
        return None


@dataclass(frozen=True)
class Redirect:
    op: str  # > >> >| < <> &> &>> >& <& << <<<
    target: Word | None  # the file (None for a heredoc or a descriptor copy)
    fd: int | None = None


@dataclass(frozen=True)
class Command:
    words: tuple  # Word: the name and the arguments
    redirects: tuple = ()
    cwds: frozenset = frozenset()  # where it may run (UNKNOWN: anywhere)
    pipeline: tuple | None = None  # (pipeline id, stage) when piped
    via: str | None = None  # what ran it: "$(…)", "bash -c", "xargs", "sudo", ...
    stdin: str | None = None  # a heredoc or here-string's text
    wraps: bool = False  # it runs the command that follows it in the list

    @property
    def name(self):
        return self.words[0].text if self.words else None


# === Walking ====================================================================


@dataclass(frozen=True)
class _State:
    cwds: frozenset
    env: dict  # name -> tuple of possible values, or None: unknown


def _merge(*states):
    env = {}
    for name in set().union(*(s.env for s in states)):
        values = [s.env.get(name, None) for s in states]
        env[name] = None if any(v is None for v in values) else \
            tuple(dict.fromkeys(x for v in values for x in v))
    return _State(frozenset().union(*(s.cwds for s in states)), env)


class _Walker:
    """The simple commands of a parsed script, with what they expand to."""

    def __init__(self, home):
        self.home = home
        self.out = []
        self.functions = set()
        self.pipelines = 0
        self.moved = None  # where the last ``cd`` went, if it succeeded
        self.fed = Word((UNKNOWN,))  # what the pipeline stage before prints

    def run(self, node, state, depth, via=None, pipeline=None):
        kind = node[0]
        if kind == "list":
            for item in node[1]:
                state = self.run(item, state, depth, via, pipeline)
            return state
        if kind == "and_or":
            seen = []
            for item, op in itertools.zip_longest(node[1], node[2]):
                self.moved = None
                state = self.run(item, state, depth, via, pipeline)
                seen.append(state)
                if op == "&&" and self.moved is not None and item[0] == "pipeline" \
                        and len(item[1]) == 1 and item[1][0][0] == "simple":
                    # "cd DIR && ...": what follows runs only if it moved.
                    state = _State(self.moved, state.env)
            # Any part may fail and the rest be skipped: after the list,
            # each point reached is where the text may go on from.
            return _merge(*seen)
        if kind == "pipeline":
            if len(node[1]) == 1:
                return self.run(node[1][0], state, depth, via, pipeline)
            self.pipelines += 1
            number, fed = self.pipelines, self.fed
            for stage, item in enumerate(node[1]):  # each stage is a subshell
                mark = len(self.out)
                self.run(item, state, depth, via, (number, stage))
                producers = [c for c in self.out[mark:] if c.pipeline == (number, stage)
                             and not c.wraps]
                self.fed = _output(producers[-1]) if producers else Word((UNKNOWN,))
            self.fed = fed
            return state
        if kind == "simple":
            return self.simple(node[1], node[2], state, depth, via, pipeline)
        if kind == "group":
            inner = self.run(node[1], state, depth + 1, via, pipeline)
            self.redirects_only(node[2], state, depth, via, pipeline)
            return state if node[3] else inner
        if kind == "if":
            states = [self.run(item, state, depth, via, pipeline) for item in node[1]]
            self.redirects_only(node[2], state, depth, via, pipeline)
            return _merge(state, *states)
        if kind in ("loop", "for"):
            return self.loop(node, state, depth, via, pipeline)
        if kind == "case":
            self.word(node[1], state, depth, via) if node[1] is not None else None
            states = [self.run(item, state, depth, via, pipeline) for item in node[2]]
            self.redirects_only(node[3], state, depth, via, pipeline)
            return _merge(state, *states)
        if kind == "function":
            self.functions.add(node[1])
            self.run(node[2], state, depth, "function " + node[1], pipeline)
            return state
        raise AssertionError(kind)

    def loop(self, node, state, depth, via, pipeline):
        """A body may run any number of times: walked from what the text
        held before it, then again from what one pass left, whose commands
        are the ones kept. A working directory still moving after two passes
        is unknown."""
        def one_pass(start):
            if node[0] == "for":
                env = dict(start.env)
                if node[1] is not None:
                    words = [self.word(w, start, depth, via) for w in node[2]] \
                        if node[2] is not None else None
                    env[node[1]] = None if words is None or any(
                        UNKNOWN in v for w in words for v in w.values) else \
                        tuple(v for w in words for v in w.values)[:MAX_VALUES]
                start = _State(start.cwds, env)
                return self.run(node[3], start, depth, via, pipeline)
            for item in node[1]:
                start = self.run(item, start, depth, via, pipeline)
            return start
        mark = len(self.out)
        first = _merge(state, one_pass(state))
        del self.out[mark:]
        second = _merge(first, one_pass(first))
        if second.cwds != first.cwds:
            second = _State(second.cwds | {UNKNOWN}, second.env)
        self.redirects_only(node[-1], state, depth, via, pipeline)
        return second

    def redirects_only(self, redirects, state, depth, via, pipeline):
        if redirects:
            self.emit(Command((), self.redirect_list(redirects, state, depth, via)[0],
                              state.cwds, pipeline, via))

    def emit(self, command):
        if len(self.out) >= MAX_COMMANDS:
            raise ShellError("too many commands to follow")
        self.out.append(command)

    # --- one simple command -------------------------------------------------

    def simple(self, tokens, redirects, state, depth, via, pipeline):
        assignments, i = [], 0
        while i < len(tokens) and _assignment(tokens[i]):
            assignments.append(tokens[i])
            i += 1
        env = dict(state.env)
        for token in assignments:
            name, word = self.assignment(token, state, depth, via)
            env[name] = None if any(UNKNOWN in v for v in word.values) else word.values
        words = []
        for token in tokens[i:]:
            words += self.words(token, state, depth, via)
        redirs, stdin = self.redirect_list(redirects, state, depth, via)
        if not words:
            if redirs:
                self.emit(Command((), redirs, state.cwds, pipeline, via, stdin))
            return _State(state.cwds, env)  # assignments persist
        name = words[0].text
        if name in self.functions:
            return state
        command = Command(tuple(words), redirs, state.cwds, pipeline, via, stdin)
        if name in ("export", "declare", "typeset", "local", "readonly"):
            env = dict(state.env)
            for token in tokens[i + 1:]:
                if _assignment(token):
                    key, word = self.assignment(token, state, depth, via)
                    env[key] = None if any(UNKNOWN in v for v in word.values) \
                        else word.values
            self.emit(command)
            return _State(state.cwds, env)
        if name in ("read", "mapfile", "readarray", "getopts"):
            env = dict(state.env)
            for word in words[1:]:
                if word.text and not word.text.startswith("-"):
                    env[word.text] = None
            self.emit(command)
            return _State(state.cwds, env)
        if name == "unset":
            env = dict(state.env)
            for word in words[1:]:
                if word.text:
                    env[word.text] = ("",)
            self.emit(command)
            return _State(state.cwds, env)
        if name in ("cd", "pushd", "popd"):
            self.emit(command)
            self.moved = self.cd(words, state)
            return _State(state.cwds | self.moved, state.env)  # it may fail
        self.emit(command)
        self.inner(command, state, depth)
        return state

    def cd(self, words, state):
        args = [w for w in words[1:] if not (w.text or "").startswith("-") or w.text == "-"]
        if words[0].text == "popd" or (args and args[0].text == "-"):
            return frozenset({UNKNOWN})
        targets = args[0].values if args else (self.home or UNKNOWN,)
        cwds = set()
        for cwd in state.cwds:
            for target in targets:
                path = resolve(target, None if cwd == UNKNOWN else cwd, self.home)
                cwds.add(path if path is not None and UNKNOWN not in path else UNKNOWN)
        return frozenset(cwds)

    def inner(self, command, state, depth):
        """The commands that ``command`` runs in turn."""
        name = base_name(command.name)
        words = command.words
        if name == "eval" and len(words) > 1:
            self.nested(" ".join(w.values[0] for w in words[1:]) if all(
                w.text is not None for w in words[1:]) else None, command, state, depth,
                "eval")
        elif name in SHELLS or (name == "su" and _option_value(words, "-c")):
            code = _option_value(words, "-c")
            if code is not None:
                self.nested(code.text, command, state, depth, f"{name} -c")
            elif command.stdin is not None and not any(
                    not (w.text or "").startswith("-") for w in words[1:]):
                self.nested(command.stdin, command, state, depth, f"{name} <<")
        elif name == "xargs":
            self.xargs(command, state, depth)
        elif name == "find":
            self.find(command, state, depth)
        elif name in WRAPPERS:
            rest, cwds = _unwrap(name, words, state.cwds, self.home)
            if rest:
                inner = replace(command, words=tuple(rest), cwds=cwds, via=name, stdin=None)
                self.out[-1] = replace(command, wraps=True)
                self.emit(inner)
                self.inner(inner, _State(cwds, state.env), depth)
        elif run := runner_command(words):
            inner = replace(command, words=tuple(run), via=name, stdin=None)
            self.out[-1] = replace(command, wraps=True)
            self.emit(inner)
            self.inner(inner, state, depth)
        elif name == "watch":
            rest, i = [], 1
            while i < len(words) and (words[i].text or "").startswith("-"):
                i += 2 if words[i].text in ("-n", "--interval") else 1
            rest = list(words[i:])
            if rest and all(w.text is not None for w in rest):
                self.out[-1] = replace(command, wraps=True)
                self.nested(" ".join(w.text for w in rest), command, state, depth, "watch")

    def nested(self, code, command, state, depth, via):
        if code is None:
            return  # unknown code: the judge sees the command itself
        if depth >= MAX_DEPTH:
            raise ShellError("nested too deeply")
        tree = parse(code, depth + 1)
        self.run(tree, state, depth + 1, via, command.pipeline)

    def xargs(self, command, state, depth):
        words, i, replace_with = command.words, 1, None
        takes_value = {"-I", "-i", "-n", "-P", "-L", "-l", "-d", "-E", "-e", "-s", "-a"}
        while i < len(words) and (words[i].text or "").startswith("-"):
            flag = words[i].text
            if flag == "--":
                i += 1
                break
            if flag in ("-I", "-i") and i + 1 < len(words):
                replace_with = words[i + 1].text
            if flag in takes_value:
                i += 1
            i += 1
        rest = list(words[i:]) or [Word(("echo",))]
        piped = command.pipeline is not None and command.pipeline[1] > 0
        items = self.fed if piped else Word((UNKNOWN,))
        if replace_with:
            rest = [items if replace_with in (w.text or "") else w for w in rest]
        else:
            rest.append(items)
        inner = replace(command, words=tuple(rest), via="xargs", stdin=None)
        self.out[-1] = replace(command, wraps=True)
        self.emit(inner)
        self.inner(inner, state, depth)

    def find(self, command, state, depth):
        found, words = _found(command.words[1:])
        i = 0
        while i < len(words):
            flag = words[i].text
            if flag in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < len(words) and words[j].text not in (";", "+"):
                    j += 1
                argv = tuple(found if (w.text or "") == "{}" else w for w in words[i + 1:j])
                if argv:
                    inner = replace(command, words=argv, via="find " + flag, stdin=None)
                    self.emit(inner)
                    self.inner(inner, state, depth)
                i = j
            elif flag == "-delete":
                self.emit(replace(command, words=(Word(("rm",)), Word(("-r",)), found),
                                  via="find -delete", stdin=None))
            elif flag in ("-fprint", "-fprint0", "-fprintf", "-fls") and i + 1 < len(words):
                self.emit(Command((), (Redirect(">", words[i + 1]),), command.cwds,
                                  command.pipeline, "find " + flag))
            i += 1

    # --- words ------------------------------------------------------------------

    def assignment(self, token, state, depth, via):
        """(name, value) of ``NAME=value``; a leading ``~`` is the home."""
        name, _, value = token.parts[0][1].partition("=")
        if value == "~" or value.startswith("~/"):
            value = (self.home or UNKNOWN) + value[1:]
        parts = [("lit", value, True)] + list(token.parts[1:])
        return name.rstrip("+"), self.word_from(parts, state, depth, via, split=False)

    def word(self, token, state, depth, via):
        return self.word_from(token.parts, state, depth, via, split=False)

    def words(self, token, state, depth, via):
        """A word token as the words it becomes: an unquoted variable alone
        splits on blanks (its fields all become the word's values)."""
        return [self.word_from(token.parts, state, depth, via, split=True)]

    def word_from(self, parts, state, depth, via, split):
        values, glob, subs = [""], False, []
        for part in parts:
            kind = part[0]
            if kind == "lit":
                options = (part[1],)
                glob = glob or (not part[2] and _globby(part[1]))
            elif kind == "tilde":
                options = ((self.home or UNKNOWN) if part[1] == "" else UNKNOWN,)
            elif kind == "var":
                known = _special(part[1], state, self.home)
                options = known if known is not None else (UNKNOWN,)
                if not part[2]:
                    glob = glob or any(_globby(v) for v in options)
                    if split and len(parts) == 1:
                        options = tuple(dict.fromkeys(
                            f for v in options for f in (v.split() or [""])))
            elif kind in ("sub", "proc"):
                tokens = part[1] if kind == "sub" else part[2]
                mark = len(self.out)
                if depth >= MAX_DEPTH:
                    raise ShellError("nested too deeply")
                self.run(parse_tokens(tokens), state, depth + 1,
                         "$(…)" if kind == "sub" else part[1] + "(…)")
                subs.append(tuple(self.out[mark:]))
                options = (UNKNOWN,)
            else:  # opaque: ${X:-$(cmd)}
                inner = self.word_from(part[1], state, depth, via, split=False)
                subs += inner.subs
                options = (UNKNOWN,)
            values = [v + o for v in values for o in options]
            if len(values) > MAX_VALUES:
                values = [UNKNOWN]
        return Word(tuple(dict.fromkeys(values)), glob, tuple(subs))

    def redirect_list(self, redirects, state, depth, via):
        out, stdin = [], None
        for token, target in redirects:
            if token.heredoc is not None:
                stdin = token.heredoc.body or ""
                out.append(Redirect("<<", None, token.fd))
                continue
            word = self.word(target, state, depth, via)
            if token.text in (">&", "<&") and (word.text or "").rstrip("-").isdigit() \
                    or word.text == "-":
                out.append(Redirect(token.text, None, token.fd))
                continue
            if token.text == "<<<":
                stdin = word.text if word.text is not None else UNKNOWN
                out.append(Redirect("<<<", None, token.fd))
                continue
            out.append(Redirect(token.text, word, token.fd))
        return tuple(out), stdin


def _output(command):
    """What a pipeline stage prints, as a word for ``xargs``: the names a
    ``find`` or a file lister turns up, the words an ``echo`` prints, else
    unknown."""
    name = base_name(command.name)
    words = command.words[1:]
    if name in ("echo", "printf"):
        values = [v for w in words if not (w.text or "").startswith("-") for value in w.values
                  for v in (value.split() or [""])]
        return Word(tuple(dict.fromkeys(values))[:MAX_VALUES] or ("",))
    if name == "find":
        return _found(words)[0]
    listed = name in ("fd", "fdfind") or (name in ("grep", "rg", "ag") and any(
        (w.text or "") in ("-l", "--files-with-matches", "--files") for w in words)) or (
        name == "git" and any((w.text or "") in ("ls-files", "--name-only") for w in words))
    if listed:
        return Word(("./" + BELOW,))
    return Word((UNKNOWN,))


def _found(words):
    """(the paths a ``find`` turns up, as a word; its words after the
    roots): an unknown word is a root too, the default root is ``.``."""
    roots = []
    while words and not (words[0].text is not None
                         and words[0].text.startswith(("-", "(", "!"))):
        roots.append(words[0])
        words = words[1:]
    found = Word(tuple(dict.fromkeys(
        (v.rstrip("/") or "/") + "/" + BELOW
        for root in (roots or [Word((".",))]) for v in root.values))[:MAX_VALUES])
    return found, words


def _assignment(token):
    """Whether a word token is ``NAME=value`` (or ``NAME+=value``) as written."""
    if token.kind != "word" or not token.parts or token.parts[0][0] != "lit" \
            or token.parts[0][2]:
        return False
    return _assignment_text(token.parts[0][1], append=True)


def _globby(text):
    return "*" in text or "?" in text or ("[" in text and "]" in text)


def _special(name, state, home):
    if name in state.env:
        return state.env[name]
    if name == "HOME" and home:
        return (home,)
    if name == "PWD" and len(state.cwds) == 1 and UNKNOWN not in state.cwds:
        return tuple(state.cwds)
    return None


def base_name(name):
    """A command's name without its directory (``/usr/bin/rm``: ``rm``)."""
    return name.rsplit("/", 1)[-1] if name else name


def _option_value(words, flag):
    """The word after ``flag`` (or after a bundle ending in it, ``-lc``)."""
    for i, word in enumerate(words[1:-1], start=1):
        text = word.text or ""
        if text == flag or (text.startswith("-") and not text.startswith("--")
                            and text.endswith(flag[1:]) and len(flag) == 2):
            return words[i + 1]
    return None


# Commands that run the command after their options: the options that take
# a value (skipped with it), and the one that changes directory, if any.
WRAPPERS = {
    "env": ({"-u", "--unset", "-S", "--split-string"}, {"-C", "--chdir"}),
    "sudo": ({"-u", "-g", "-C", "-h", "-p", "-r", "-t", "-U", "-T", "--user", "--group"},
             {"-D", "--chdir"}),
    "doas": ({"-u", "-C"}, set()),
    "pkexec": ({"--user"}, set()),
    "nohup": (set(), set()),
    "time": ({"-f", "-o"}, set()),
    "nice": ({"-n", "--adjustment"}, set()),
    "ionice": ({"-c", "-n", "-p"}, set()),
    "timeout": ({"-s", "-k", "--signal", "--kill-after"}, set()),
    "stdbuf": ({"-i", "-o", "-e"}, set()),
    "command": (set(), set()),
    "builtin": (set(), set()),
    "exec": ({"-a"}, set()),
    "setsid": (set(), set()),
    "unbuffer": (set(), set()),
    "caffeinate": ({"-t", "-w"}, set()),
    "xvfb-run": ({"-n", "-s", "-f", "-e", "--server-num", "--server-args"}, set()),
    "flock": ({"-w", "-E", "--timeout"}, set()),
    "taskset": (set(), set()),
    "chrt": (set(), set()),
}
# These take a positional argument before the command.
POSITIONAL = {"timeout": 1, "flock": 1, "taskset": 1, "chrt": 1}
# Runners of a project's environment: "uv run CMD", "poetry run CMD", ...
RUNNERS = {("uv", "run"), ("poetry", "run"), ("pipenv", "run"), ("pdm", "run"),
           ("hatch", "run"), ("rye", "run"), ("bundle", "exec"), ("conda", "run"),
           ("mamba", "run"), ("pixi", "run")}


def _unwrap(name, words, cwds, home):
    """(the wrapped command's words, where it runs)."""
    valued, chdir = WRAPPERS[name]
    i = 1
    while i < len(words):
        text = words[i].text
        if text is None:
            return [], cwds
        if text == "--":
            i += 1
            break
        if name == "env" and _assignment_text(text):
            i += 1
            continue
        if name == "command" and text in ("-v", "-V"):
            return [], cwds  # a lookup, nothing run
        if not text.startswith("-"):
            break
        flag, eq, value = text.partition("=")
        if flag in chdir:
            target = value if eq else (words[i + 1].text if i + 1 < len(words) else None)
            cwds = frozenset(resolve(target, c, home) or UNKNOWN for c in cwds) \
                if target else frozenset({UNKNOWN})
        if (flag in valued or flag in chdir) and not eq:
            i += 1
        i += 1
    i += POSITIONAL.get(name, 0)
    return list(words[i:]), cwds


def _assignment_text(text, append=False):
    name, eq, _ = text.partition("=")
    if append and name.endswith("+"):
        name = name[:-1]
    return bool(eq) and name.isidentifier()


def runner_command(words):
    """For ``uv run pytest`` and the like, the words of the command run."""
    if len(words) > 2 and (words[0].text, words[1].text) in RUNNERS:
        rest = list(words[2:])
        while rest and (rest[0].text or "").startswith("-"):
            flag = rest.pop(0).text
            if flag in ("-n", "--name", "-p", "--prefix", "-e", "--env", "--with",
                        "--python", "--directory", "--project", "--extra", "--group"):
                rest = rest[1:]
            if flag == "--":
                break
        return rest
    return []


def commands(text, cwd, home, env=None):
    """Every simple command ``text`` may run, in order (raises ShellError)."""
    tree = parse(text)
    walker = _Walker(home)
    start = _State(frozenset({cwd or UNKNOWN}), dict(env or {}))
    walker.run(tree, start, 0)
    return walker.out
