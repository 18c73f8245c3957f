"""Shell text as syntax, for the auto-mode judge: the bash a coding agent
writes (lists, pipelines, ``$(…)`` and backticks, process substitution,
redirections, heredocs, ``if``/``for``/``while``/``case``, subshells, groups,
functions) parsed into a tree of tuples (see "Parsing"), words kept as their
parts (literal, quoted or not, variables, substitutions). Nothing is
expanded or run here: ``safeguards.walk`` does that."""

from dataclasses import dataclass, field

from safeguards.paths import UNKNOWN

MAX_DEPTH = 24  # nested substitutions, ``bash -c`` and groups



class ShellError(ValueError):
    """Text the parser cannot follow (a syntax error, or too deep)."""


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


def parse(text, depth=0):
    """The tree of ``text`` (raises ShellError)."""
    if depth > MAX_DEPTH:
        raise ShellError("nested too deeply")
    return _Parser(_Lexer(text, depth).tokens()).script()


def parse_tokens(tokens):
    """The tree of a substitution's tokens, as the lexer left them."""
    return _Parser(tokens).script()
