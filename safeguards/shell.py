"""Shell text as the commands it may run, for the auto-mode judge: the bash
a coding agent writes (lists, pipelines, ``$(…)`` and backticks, process
substitution, redirections, heredocs, ``if``/``for``/``while``/``case``,
subshells, groups, functions) is parsed, then walked symbolically: variables
it sets and ``for`` lists are followed, ``cd`` moves the working directory,
and the commands other commands run are opened up (``bash -c``, ``eval``,
``xargs``, ``find -exec``/``-delete``, ``env``, ``sudo``, ``timeout``, ...).
Nothing is run. ``commands(text, cwd, home)`` lists every simple command the
text may run, in order; text the walk cannot know is ``paths.UNKNOWN``."""

import itertools
from dataclasses import dataclass, field, replace

from safeguards.paths import BELOW, UNKNOWN, resolve

MAX_DEPTH = 24  # nested substitutions, ``bash -c`` and groups
MAX_COMMANDS = 5000  # simple commands walked for one text
MAX_VALUES = 16  # possible values kept for one word

RESERVED = {"if", "then", "elif", "else", "fi", "for", "while", "until", "do", "done",
            "case", "esac", "in", "{", "}", "!", "function", "select", "time"}
SHELLS = {"bash", "sh", "zsh", "dash", "ksh", "mksh", "ash", "busybox"}


class ShellError(ValueError):
    """Text the parser cannot follow (a syntax error, or too deep)."""


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


# === Lexing =====================================================================

OPERATORS = ("&&", "||", ";;&", ";;", ";&", "|&", "&>>", "&>", ">>", ">|", "<<<", "<<-",
             "<<", "<>", ">&", "<&", "<(", ">(", "|", "&", ";", "(", ")", "<", ">", "\n")
REDIRECTS = {"&>>", "&>", ">>", ">|", "<<<", "<<-", "<<", "<>", ">&", "<&", "<", ">"}


@dataclass
class _Heredoc:
    delimiter: str
    quoted: bool
    strip: bool
    body: str | None = None


@dataclass
class _Token:
    kind: str  # "word", "op", "redir"
    text: str  # the source text (word), the operator
    parts: list = field(default_factory=list)  # word parts
    fd: int | None = None
    heredoc: _Heredoc | None = None


class _Lexer:
    """Tokens of a script: words as parts, operators, redirections (with
    their heredoc bodies). ``stop`` ends it at an unmatched ``)``."""

    def __init__(self, text, depth):
        self.text, self.i, self.depth = text, 0, depth
        self.pending = []  # heredocs whose bodies start after the next newline

    def tokens(self, stop=None):
        out, nesting = [], 0
        while True:
            self._blank()
            if self.i >= len(self.text):
                if stop:
                    raise ShellError("unclosed $( or (")
                break
            c = self.text[self.i]
            if c == "#" and (self.i == 0 or self.text[self.i - 1] in " \t\n;&|()"):
                while self.i < len(self.text) and self.text[self.i] != "\n":
                    self.i += 1
                continue
            if stop and c == ")" and nesting == 0:
                self.i += 1
                break
            digits = self._fd_digits()
            op = next((o for o in OPERATORS if self.text.startswith(o, self.i + digits)), None)
            if op and (digits == 0 or op in REDIRECTS):
                out.append(self._operator(op, digits))
                if op in ("(", "<(", ">("):
                    nesting += op == "("
                elif op == ")":
                    nesting -= 1
                continue
            out.append(self._word())
        if self.pending:  # bodies running to the end of the text
            self._bodies()
        return out

    def _blank(self):
        while self.i < len(self.text):
            if self.text[self.i] in " \t\r":
                self.i += 1
            elif self.text.startswith("\\\n", self.i):
                self.i += 2
            else:
                break

    def _fd_digits(self):
        j = self.i
        while j < len(self.text) and self.text[j].isdigit():
            j += 1
        return j - self.i if j > self.i and self.text[j:j + 1] in ("<", ">") else 0

    def _operator(self, op, digits):
        fd = int(self.text[self.i:self.i + digits]) if digits else None
        self.i += digits + len(op)
        if op == "\n":
            self._bodies()
            return _Token("op", "\n")
        if op in ("<(", ">("):
            script = self._nested_tokens()
            return _Token("word", op + "…)", [("proc", op[0], script)])
        if op in ("<<", "<<-"):
            self._blank()
            word = self._word()
            heredoc = _Heredoc(_literal(word.parts), any(p[0] == "lit" and p[2]
                                                         for p in word.parts), op == "<<-")
            self.pending.append(heredoc)
            return _Token("redir", "<<", fd=fd, heredoc=heredoc)
        if op in REDIRECTS:
            return _Token("redir", op, fd=fd)
        return _Token("op", op)

    def _bodies(self):
        for heredoc in self.pending:
            lines = []
            while self.i < len(self.text):
                end = self.text.find("\n", self.i)
                end = len(self.text) if end < 0 else end
                line = self.text[self.i:end]
                self.i = end + 1
                if heredoc.strip:
                    line = line.lstrip("\t")
                if line == heredoc.delimiter:
                    break
                lines.append(line)
            heredoc.body = "\n".join(lines)
        self.pending = []

    def _nested_tokens(self):
        if self.depth >= MAX_DEPTH:
            raise ShellError("nested too deeply")
        inner = _Lexer(self.text, self.depth + 1)
        inner.i = self.i
        tokens = inner.tokens(stop=")")
        self.i = inner.i
        return tokens

    def _word(self):
        start, parts = self.i, []
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c in " \t\r\n;&|()<>":
                break
            if c == "\\":
                if text.startswith("\\\n", self.i):
                    self.i += 2
                    continue
                parts.append(("lit", text[self.i + 1:self.i + 2], True))
                self.i += 2
            elif c == "'":
                end = text.find("'", self.i + 1)
                if end < 0:
                    raise ShellError("unclosed single quote")
                parts.append(("lit", text[self.i + 1:end], True))
                self.i = end + 1
            elif c == '"':
                self.i += 1
                parts += self._double_quoted()
            elif c == "$":
                parts.append(self._dollar(quoted=False))
            elif c == "`":
                parts.append(self._backtick(quoted=False))
            elif c == "~" and self.i == start:
                j = self.i + 1
                while j < len(text) and (text[j].isalnum() or text[j] in "_.-"):
                    j += 1
                if j == len(text) or text[j] in "/ \t\n;&|()<>":
                    parts.append(("tilde", text[self.i + 1:j]))
                    self.i = j
                else:
                    parts.append(("lit", "~", False))
                    self.i += 1
            else:
                j = self.i
                while j < len(text) and text[j] not in " \t\r\n;&|()<>\\'\"$`":
                    j += 1
                parts.append(("lit", text[self.i:j], False))
                self.i = j
        if not parts:
            raise ShellError(f"unexpected {text[self.i:self.i + 1]!r}")
        return _Token("word", text[start:self.i], parts)

    def _double_quoted(self):
        parts, text = [], self.text
        while True:
            if self.i >= len(text):
                raise ShellError("unclosed double quote")
            c = text[self.i]
            if c == '"':
                self.i += 1
                return parts or [("lit", "", True)]
            if c == "\\" and text[self.i + 1:self.i + 2] in ('"', "\\", "$", "`", "\n"):
                if text[self.i + 1] != "\n":
                    parts.append(("lit", text[self.i + 1], True))
                self.i += 2
            elif c == "$":
                parts.append(self._dollar(quoted=True))
            elif c == "`":
                parts.append(self._backtick(quoted=True))
            else:
                j = self.i + 1 if c == "\\" else self.i
                while j < len(text) and text[j] not in '"\\$`':
                    j += 1
                parts.append(("lit", text[self.i:j], True))
                self.i = j

    def _dollar(self, quoted):
        text, i = self.text, self.i + 1
        if text.startswith("((", i):
            end = text.find("))", i + 2)
            if end < 0:
                raise ShellError("unclosed $((")
            inner = text[i + 2:end]
            self.i = end + 2
            if "$(" in inner or "`" in inner:
                raise ShellError("a substitution inside arithmetic")
            return ("lit", UNKNOWN, quoted)
        if text.startswith("(", i):
            self.i = i + 1
            return ("sub", self._nested_tokens(), quoted)
        if text.startswith("{", i):
            end, nest = i + 1, 1
            while end < len(text) and nest:
                nest += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if nest:
                raise ShellError("unclosed ${")
            inner = text[i + 1:end - 1]
            self.i = end
            return self._parameter(inner, quoted)
        if text.startswith("'", i) and not quoted:  # $'...': ANSI-C quoting
            end = i + 1
            while end < len(text) and text[end] != "'":
                end += 2 if text[end] == "\\" else 1
            if end >= len(text):
                raise ShellError("unclosed $'")
            self.i = end + 1
            return ("lit", _ansi_c(text[i + 1:end]), True)
        if text.startswith('"', i) and not quoted:
            self.i = i
            return ("lit", "", True)
        j = i
        if j < len(text) and (text[j].isalpha() or text[j] == "_"):
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
        elif j < len(text) and (text[j].isdigit() or text[j] in "@*#?$!-"):
            j += 1
        if j == i:
            self.i = i
            return ("lit", "$", quoted)
        self.i = j
        return ("var", text[i:j], quoted)

    def _parameter(self, inner, quoted):
        """``${...}``: the variable, or unknown with any substitution in its
        operand (``${X:-$(cmd)}``) kept to be walked."""
        name = inner.lstrip("#!")
        j = 0
        while j < len(name) and (name[j].isalnum() or name[j] == "_"):
            j += 1
        if j == len(name) and name and inner == name:
            return ("var", name, quoted)
        if "$(" in inner or "`" in inner:
            lexer = _Lexer(inner[j:], self.depth + 1)
            if lexer.depth > MAX_DEPTH:
                raise ShellError("nested too deeply")
            words = [t for t in lexer.tokens() if t.kind == "word"]
            return ("opaque", [p for w in words for p in w.parts])
        return ("lit", UNKNOWN, quoted)

    def _backtick(self, quoted):
        text, j, chars = self.text, self.i + 1, []
        while j < len(text) and text[j] != "`":
            if text[j] == "\\" and text[j + 1:j + 2] in ("`", "\\", "$"):
                j += 1
            chars.append(text[j])
            j += 1
        if j >= len(text):
            raise ShellError("unclosed backtick")
        self.i = j + 1
        if self.depth >= MAX_DEPTH:
            raise ShellError("nested too deeply")
        return ("sub", _Lexer("".join(chars), self.depth + 1).tokens(), quoted)


def _literal(parts):
    return "".join(p[1] for p in parts if p[0] == "lit")


def _ansi_c(text):
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a",
               "b": "\b", "e": "\x1b", "f": "\f", "v": "\v", "0": "\0"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            c = text[i + 1]
            if c == "x":
                digits = "".join(ch for ch in text[i + 2:i + 4]
                                 if ch in "0123456789abcdefABCDEF")
                out.append(chr(int(digits, 16)) if digits else "\\x")
                i += 2 + len(digits)
                continue
            out.append(escapes.get(c, "\\" + c))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# === Parsing ====================================================================
# Nodes are tuples: ("list", [and_or...]), ("and_or", [pipeline...], [ops]),
# ("pipeline", [command...]), ("simple", [tokens], [redirs]),
# ("group", list, redirs, subshell), ("if", [lists], redirs),
# ("for", name, words or None, body, redirs), ("loop", [lists], redirs),
# ("case", word, [lists], redirs), ("function", name, body).


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def script(self):
        node = self.list(())
        if self.i < len(self.tokens):
            raise ShellError(f"unexpected {self.tokens[self.i].text!r}")
        return node

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def reserved(self, *words):
        token = self.peek()
        return (token is not None and token.kind == "word" and token.text in words
                and all(p[0] == "lit" and not p[2] for p in token.parts))

    def op(self, *ops):
        token = self.peek()
        return token is not None and token.kind == "op" and token.text in ops

    def expect_word(self, word):
        if not self.reserved(word):
            raise ShellError(f"expected {word!r}")
        self.i += 1

    def newlines(self):
        while self.op("\n"):
            self.i += 1

    def list(self, enders):
        items = []
        while True:
            self.newlines()
            if self.peek() is None or self.op(")", ";;", ";&", ";;&") \
                    or self.reserved(*enders):
                return ("list", items)
            items.append(self.and_or(enders))
            if self.op(";", "&", "\n"):
                self.i += 1
            elif not (self.peek() is None or self.op(")", ";;", ";&", ";;&")
                      or self.reserved(*enders)):
                raise ShellError(f"unexpected {self.peek().text!r}")

    def and_or(self, enders):
        pipelines, ops = [self.pipeline(enders)], []
        while self.op("&&", "||"):
            ops.append(self.tokens[self.i].text)
            self.i += 1
            self.newlines()
            pipelines.append(self.pipeline(enders))
        return ("and_or", pipelines, ops)

    def pipeline(self, enders):
        while self.reserved("!", "time"):
            self.i += 1
        commands = [self.command(enders)]
        while self.op("|", "|&"):
            self.i += 1
            self.newlines()
            commands.append(self.command(enders))
        return ("pipeline", commands)

    def command(self, enders):
        if self.op("("):
            self.i += 1
            if self.op("("):  # (( arithmetic ))
                return self.arithmetic()
            body = self.list(())
            if not self.op(")"):
                raise ShellError("unclosed (")
            self.i += 1
            return ("group", body, self.redirects(), True)
        if self.reserved("{"):
            self.i += 1
            body = self.list(("}",))
            self.expect_word("}")
            return ("group", body, self.redirects(), False)
        if self.reserved("if"):
            return self.if_()
        if self.reserved("for", "select"):
            return self.for_()
        if self.reserved("while", "until"):
            self.i += 1
            condition = self.list(("do",))
            self.expect_word("do")
            body = self.list(("done",))
            self.expect_word("done")
            return ("loop", [condition, body], self.redirects())
        if self.reserved("case"):
            return self.case()
        if self.reserved("function"):
            self.i += 1
            name = self.peek()
            self.i += 1
            if self.op("("):
                self.i += 2
            self.newlines()
            return ("function", name.text if name else "", self.command(enders))
        token = self.peek()
        following = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
        after = self.tokens[self.i + 2] if self.i + 2 < len(self.tokens) else None
        if token is not None and token.kind == "word" and following is not None \
                and following.kind == "op" and following.text == "(" \
                and after is not None and after.kind == "op" and after.text == ")":
            self.i += 3
            self.newlines()
            return ("function", token.text, self.command(enders))
        return self.simple()

    def arithmetic(self):
        depth = 2
        self.i += 1
        while self.peek() is not None and depth:
            depth += {"(": 1, ")": -1}.get(self.peek().text, 0) if self.peek().kind == "op" \
                else 0
            self.i += 1
        return ("simple", [], [])

    def if_(self):
        lists = []
        self.i += 1
        while True:
            lists.append(self.list(("then",)))
            self.expect_word("then")
            lists.append(self.list(("elif", "else", "fi")))
            if self.reserved("elif"):
                self.i += 1
                continue
            if self.reserved("else"):
                self.i += 1
                lists.append(self.list(("fi",)))
            self.expect_word("fi")
            return ("if", lists, self.redirects())

    def for_(self):
        self.i += 1
        if self.op("("):  # for (( ...; ...; ... ))
            self.i += 1
            self.arithmetic()
            name, words = None, None
        else:
            token = self.peek()
            if token is None or token.kind != "word":
                raise ShellError("expected a name after for")
            name, words = token.text, None
            self.i += 1
            self.newlines()
            if self.reserved("in"):
                self.i += 1
                words = []
                while self.peek() is not None and self.peek().kind == "word":
                    words.append(self.peek())
                    self.i += 1
        if self.op(";", "\n"):
            self.i += 1
        self.newlines()
        self.expect_word("do")
        body = self.list(("done",))
        self.expect_word("done")
        return ("for", name, words, body, self.redirects())

    def case(self):
        self.i += 1
        subject = self.peek()
        self.i += 1
        self.newlines()
        self.expect_word("in")
        lists = []
        while True:
            self.newlines()
            if self.reserved("esac"):
                self.i += 1
                return ("case", subject, lists, self.redirects())
            if self.peek() is None:
                raise ShellError("unclosed case")
            if self.op("("):
                self.i += 1
            while self.peek() is not None and not self.op(")"):
                self.i += 1  # the patterns: words and |
            self.i += 1
            lists.append(self.list(("esac",)))
            if self.op(";;", ";&", ";;&"):
                self.i += 1

    def redirects(self):
        out = []
        while self.peek() is not None and self.peek().kind == "redir":
            out.append(self.redirect())
        return out

    def redirect(self):
        token = self.tokens[self.i]
        self.i += 1
        if token.heredoc is not None:
            return (token, None)
        target = self.peek()
        if target is None or target.kind != "word":
            raise ShellError(f"a redirection {token.text!r} without a target")
        self.i += 1
        return (token, target)

    def simple(self):
        words, redirects = [], []
        while True:
            token = self.peek()
            if token is None or token.kind == "op":
                break
            if token.kind == "redir":
                redirects.append(self.redirect())
            else:
                words.append(token)
                self.i += 1
        if not words and not redirects:
            token = self.peek()
            raise ShellError(f"unexpected {token.text if token else 'end'!r}")
        return ("simple", words, redirects)


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
        name = _base(command.name)
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
        elif runner_command(words):
            inner = replace(command, words=tuple(runner_command(words)), via=name,
                            stdin=None)
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
        tree = _Parser(_Lexer(code, depth + 1).tokens()).script()
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
        words = command.words[1:]
        roots = []
        while words and not (words[0].text is not None
                             and words[0].text.startswith(("-", "(", "!"))):
            roots.append(words[0])
            words = words[1:]
        found = Word(tuple(dict.fromkeys(
            (v.rstrip("/") or "/") + "/" + BELOW
            for root in (roots or [Word((".",))]) for v in root.values))[:MAX_VALUES])
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
                self.run(_Parser(tokens).script(), state, depth + 1,
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
    name = _base(command.name)
    words = command.words[1:]
    if name in ("echo", "printf"):
        values = [v for w in words if not (w.text or "").startswith("-") for value in w.values
                  for v in (value.split() or [""])]
        return Word(tuple(dict.fromkeys(values))[:MAX_VALUES] or ("",))
    if name == "find":
        roots = []
        for word in words:
            if word.text is not None and word.text.startswith(("-", "(", "!")):
                break
            roots.append(word)
        return Word(tuple(dict.fromkeys((v.rstrip("/") or "/") + "/" + BELOW
                                        for root in (roots or [Word((".",))])
                                        for v in root.values))[:MAX_VALUES])
    listed = name in ("fd", "fdfind") or (name in ("grep", "rg", "ag") and any(
        (w.text or "") in ("-l", "--files-with-matches", "--files") for w in words)) or (
        name == "git" and any((w.text or "") in ("ls-files", "--name-only") for w in words))
    if listed:
        return Word(("./" + BELOW,))
    return Word((UNKNOWN,))


def _assignment(token):
    if token.kind != "word" or not token.parts or token.parts[0][0] != "lit" \
            or token.parts[0][2]:
        return False
    head = token.parts[0][1]
    name, eq, _ = head.partition("=")
    name = name[:-1] if name.endswith("+") else name
    return bool(eq) and name.isidentifier()


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


def _base(name):
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


def _assignment_text(text):
    name, eq, _ = text.partition("=")
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
    tree = _Parser(_Lexer(text, 0).tokens()).script()
    walker = _Walker(home)
    start = _State(frozenset({cwd or UNKNOWN}), dict(env or {}))
    walker.run(tree, start, 0)
    return walker.out
