"""What shell commands do, as the judge's effects: each simple command the
walk (``walk``) finds, its operands and redirections read as files read,
written or deleted, what its pipelines feed into what, and the command's own
risk by the policy's tables (``policy``): git, downloaders, interpreters and
inline Python (parsed with ``ast``), package managers, services, ..."""

import ast
import re
import sys
from urllib.parse import urlsplit

from safeguards.paths import BELOW, UNKNOWN, known
from safeguards.policy import (
    ALIASES, CHANGERS, DELETERS, DOWNLOADERS, FLAGGED_COMMANDS, FLAGGED_SUBCOMMANDS,
    GIT_ROUTINE, INTERPRETERS, KNOWN_PACKAGES, LOOPBACK, MAKERS, METADATA_HOSTS,
    NETWORK_PACKAGES, OS_READS, POLICY_FLAG, PURE_MODULES, PYTHON_MODULES, QUIET, READERS,
    ROUTINE, SAFE, SECURITY_SERVICES, UNDECIDED, Effect, path_effect)
from safeguards.walk import SHELLS, Word, base_name, commands


# === Shell text ==================================================================


class ShellEffects:
    """The effects of one Bash command: each simple command the text may
    run, its operands and redirections, and what its pipelines feed."""

    def __init__(self, context):
        self.context = context
        self.downloaded = set()  # paths this text downloads into

    def of(self, text):
        out, stages = [], {}
        for command in commands(text, self.context.cwd, self.context.home):
            effects = self.command(command)
            out += effects
            if command.pipeline is not None:
                stages.setdefault(command.pipeline[0], []).append((command.pipeline[1],
                                                                   command))
        for stage_list in stages.values():
            out += self.pipeline(stage_list)
        return out or [Effect("run", text, SAFE, "")]

    def pipeline(self, stages):
        """A download piped into an interpreter, or local output piped into
        something that sends it away."""
        out = []
        for stage, command in stages:
            if base_name(command.name) in DOWNLOADERS and any(
                    later > stage and _reads_code_from_stdin(other)
                    for later, other in stages):
                out.append(self.flag(command, "pipes a download into a program that runs it"))
        return out

    def flag(self, command, why, level=POLICY_FLAG):
        return Effect("run", _text(command), level, why)

    def paths(self, command, word, kind):
        """Effects of ``word`` naming files, in every directory it may run in."""
        out = []
        for value in word.values:
            if value.startswith("-") and kind != "write":
                continue
            for cwd in command.cwds:
                path = self.context.resolve(value, None if cwd == UNKNOWN else cwd)
                if word.glob and path is not None and known(path) and kind == "delete":
                    path = _glob_place(path)
                out.append(path_effect(kind, path, self.context, "Bash", True,
                                        _text(command) if command.words else None))
        return out

    def command(self, command):
        out = []
        for redirect in command.redirects:
            if redirect.target is not None:
                kind = "read" if redirect.op == "<" else "write"
                out += self.paths(command, redirect.target, kind)
        if not command.words:
            return out
        names = command.words[0].values
        if len(names) > 1 or command.name is None:
            return out + [self.flag(command, "runs a command whose name the server cannot "
                                             "know", UNDECIDED)]
        return out + self.simple(command, base_name(command.name))

    def simple(self, command, name):
        words = command.words
        args = list(words[1:])
        text = _text(command)
        safe = [Effect("run", text, SAFE, "")]
        if command.wraps and name not in FLAGGED_COMMANDS:
            return safe
        if any(w.text in ("--help", "-h", "--version", "-V", "version") for w in args[:1]) \
                and name not in FLAGGED_COMMANDS and len(args) == 1:
            return safe
        if name.startswith("mkfs."):
            name = "mkfs"
        if name in FLAGGED_COMMANDS and FLAGGED_COMMANDS[name]:
            return [self.flag(command, FLAGGED_COMMANDS[name])]
        if name in ("scp", "rsync", "ssh", "sftp"):
            remote = self.remote(command, name)
            if remote is not None:
                return remote
        if name in DOWNLOADERS:
            return self.download(command, name, args)
        if name in ("git",):
            return self.git(command, args)
        if name in INTERPRETERS or name in SHELLS:
            return self.interpreter(command, name, args)
        if name in DELETERS:
            return safe + [e for w in _operands(args) for e in self.paths(command, w, "delete")]
        if name in MAKERS:
            return safe + [e for w in _operands(args) for e in self.paths(command, w, "write")]
        if name in ("chmod", "chown", "chgrp", "chattr"):
            return self.permissions(command, name, args)
        if name in READERS:
            return safe + [e for w in _operands(args) for e in self.paths(command, w, "read")]
        if name in QUIET:
            return safe
        if name in ("npx", "pnpx", "bunx", "uvx") or (name == "pipx" and args
                                                      and args[0].text == "run"):
            return self.package_runner(command, name, args)
        if name in ("systemctl", "service", "launchctl"):
            return self.services(command, name, args)
        if name in CHANGERS and name not in ROUTINE:
            return safe + [e for w in _operands(args) for e in self.paths(command, w, "write")]
        if name in ROUTINE or name in ALIASES:
            return self.routine(command, ALIASES.get(name, name), args)
        if "/" in (command.name or ""):
            return self.script(command, command.words[0])  # ./build.sh and the like
        return [self.flag(command, "runs a command the server's policy does not know",
                          UNDECIDED)]

    # --- commands by kind --------------------------------------------------------

    def remote(self, command, name):
        if name == "ssh":
            return [self.flag(command, "runs commands on another machine", UNDECIDED)]
        operands = [w.text or "" for w in _operands(command.words[1:])]
        sending = [o for o in operands[:-1] if not _is_remote(o)]
        if operands and _is_remote(operands[-1]) and sending:
            return [Effect("send", operands[-1].split(":")[0], POLICY_FLAG,
                           "copies local files to another machine")]
        if any(_is_remote(o) for o in operands):
            return [Effect("run", _text(command), SAFE, "")] + \
                self.paths(command, command.words[-1], "write")
        return None

    def download(self, command, name, args):
        """curl, wget and the like: fetching is fine, sending local data is not."""
        out = [Effect("run", _text(command), SAFE, "")]
        hosts = [urlsplit(v if "://" in v else "http://" + v).hostname or ""
                 for w in _operands(args) for v in w.values if "." in v or "://" in v
                 or v.startswith("localhost")]
        local = all(h.lower() in LOOPBACK for h in hosts) and hosts
        if any(h in METADATA_HOSTS for h in hosts):
            return [self.flag(command, "reads the cloud metadata service, which hands out "
                                       "credentials")]
        data_flags = {"-d", "--data", "--data-binary", "--data-raw", "--data-urlencode",
                      "--data-ascii", "--json", "-F", "--form", "--form-string", "-T",
                      "--upload-file", "--post-file", "--body-file", "--post-data"}
        for i, word in enumerate(args):
            flag, _, attached = (word.text or "").partition("=")
            value = attached or (args[i + 1] if i + 1 < len(args) else None)
            if flag not in data_flags and not (flag.startswith("-d") and len(flag) > 2
                                               and name == "curl"):
                continue
            if flag.startswith("-d") and len(flag) > 2 and not flag.startswith("--"):
                value = flag[2:]
            raw = value if isinstance(value, str) else (value.text if value is not None
                                                        else None)
            files = flag in ("-T", "--upload-file", "--post-file", "--body-file") or \
                (raw is not None and ("@" in raw[:1] or "=@" in raw or "=<" in raw))
            hidden = raw is None or UNKNOWN in raw
            if (files or hidden) and not local:
                return [self.flag(command, "sends local files or command output over the "
                                           "network")]
            if not local:
                out = [self.flag(command, "sends data to another server", UNDECIDED)]
        for i, word in enumerate(args):  # -o FILE / -O FILE: a download into a file
            flag = word.text or ""
            if flag in ("-o", "--output", "-O", "--output-document") and i + 1 < len(args):
                target = args[i + 1]
                if target.text == "-":
                    continue
                for effect in self.paths(command, target, "write"):
                    out.append(effect)
                    if effect.target:
                        self.downloaded.add(effect.target)
        return out

    def git(self, command, args):
        out = [Effect("run", _text(command), SAFE, "")]
        i = 0
        while i < len(args) and (args[i].text or "").startswith("-"):
            flag = args[i].text
            if flag == "-c" and i + 1 < len(args):
                key = (args[i + 1].text or "").split("=")[0].lower()
                if key in ("core.sshcommand", "core.hookspath", "core.pager", "core.editor",
                           "core.fsmonitor", "credential.helper", "core.gitproxy",
                           "diff.external", "sequence.editor", "uploadpack.packobjectshook") \
                        or key.startswith("alias."):
                    return [self.flag(command, "sets a git option that runs a command")]
                i += 1
            elif flag in ("-C", "--git-dir", "--work-tree", "--namespace"):
                i += 1
            i += 1
        if i >= len(args):
            return out
        sub, rest = args[i].text, [w.text or "" for w in args[i + 1:]]
        flags = set(rest)
        if sub is None:
            return [self.flag(command, "runs a git command the server cannot read",
                              UNDECIDED)]
        if sub == "push":
            if flags & {"-f", "--force", "--force-with-lease", "--force-if-includes",
                        "--mirror", "--prune"} or any(r.startswith(("--force-with-lease=",
                                                                   "+")) for r in rest):
                return [self.flag(command, "force-pushes, which can destroy others' "
                                           "commits on the remote")]
            if flags & {"-d", "--delete"} or any(r.startswith(":") and len(r) > 1
                                                 for r in rest):
                return [self.flag(command, "deletes a branch or tag on the remote")]
            return out
        if sub == "reset" and "--hard" in flags or sub == "reset" and "--merge" in flags:
            return [self.flag(command, "discards uncommitted changes (git reset --hard)")]
        if sub == "clean" and not flags & {"-n", "--dry-run"} and any(
                r.startswith("-") and not r.startswith("--") and "f" in r or r == "--force"
                for r in rest):
            return [self.flag(command, "deletes untracked files, which git cannot restore")]
        if sub in ("checkout", "restore") and ("." in rest or ":/" in rest) and (
                not flags & {"--staged", "-S"} or flags & {"--worktree", "-W"}):
            return [self.flag(command, "discards every uncommitted change in the working "
                                       "tree")]
        if sub == "branch" and ("-D" in flags or {"--delete", "--force"} <= flags):
            return [self.flag(command, "force-deletes a branch with unmerged work")]
        if sub == "stash" and rest[:1] in (["drop"], ["clear"]):
            return [self.flag(command, "deletes stashed work")]
        if sub in ("filter-branch", "filter-repo", "replace"):
            return [self.flag(command, "rewrites the repository's history")]
        if sub == "update-ref" and "-d" in flags or sub == "reflog" and rest[:1] in \
                (["expire"], ["delete"]):
            return [self.flag(command, "deletes references git uses to recover work")]
        if sub == "config":
            scope = flags & {"--global", "--system"}
            writes = [r for r in rest if not r.startswith("-")]
            if len(writes) >= 2 or flags & {"--unset", "--unset-all", "--add",
                                            "--replace-all", "--remove-section",
                                            "--rename-section", "-e", "--edit"}:
                key = (writes[0] if writes else "").lower()
                if key in ("core.sshcommand", "core.hookspath", "core.pager", "core.editor",
                           "core.fsmonitor", "credential.helper", "diff.external") \
                        or key.startswith("alias."):
                    return [self.flag(command, "sets a git option that runs a command")]
                if scope:
                    return [self.flag(command, "changes the user's global git "
                                               "configuration")]
            return out
        if sub in GIT_ROUTINE:
            return out
        return [self.flag(command, f"runs `git {sub}`", UNDECIDED)]

    def interpreter(self, command, name, args):
        flag = INTERPRETERS.get(name, "-c")
        text = _text(command)
        for i, word in enumerate(args):
            value = word.text or ""
            code = None
            if flag and (value == flag or (name in SHELLS and value.startswith("-")
                                           and not value.startswith("--")
                                           and value.endswith("c") and flag == "-c")):
                code = args[i + 1] if i + 1 < len(args) else None
            elif name.startswith("python") and value == "-m" and i + 1 < len(args):
                return self.python_module(command, args[i + 1], args[i + 2:])
            elif value in ("-p", "--print", "--eval") and name in ("node", "nodejs", "bun"):
                code = args[i + 1] if i + 1 < len(args) else None
            if code is not None:
                if _downloads(code):
                    return [self.flag(command, "runs code it downloads")]
                if name in SHELLS:
                    return [Effect("run", text, SAFE if code.text is not None else UNDECIDED,
                                   "runs shell text the server cannot see")]
                if name.startswith(("python", "pypy")) and code.text is not None:
                    problem = _python_problem(code.text)
                    if problem is None:
                        return [Effect("run", text, SAFE, "")]
                    return [self.flag(command, f"runs inline Python that {problem}",
                                      UNDECIDED)]
                return [self.flag(command, "runs inline code", UNDECIDED)]
            if value.startswith("-"):
                continue
            if _downloads(word):
                return [self.flag(command, "runs code it downloads")]
            return self.script(command, word)
        if command.stdin is not None and name.startswith(("python", "pypy")):
            problem = _python_problem(command.stdin) if UNKNOWN not in command.stdin \
                else "the server cannot see"
            return [Effect("run", text, SAFE, "")] if problem is None else \
                [self.flag(command, f"runs inline Python that {problem}", UNDECIDED)]
        if command.stdin is not None and name in SHELLS:
            return [Effect("run", text, SAFE, "")]  # its text was walked as commands
        if command.pipeline is not None and command.pipeline[1] > 0:
            return [self.flag(command, "runs code piped into it", UNDECIDED)]
        if name in ("awk", "gawk", "mawk"):
            return [Effect("run", text, SAFE, "")]
        return [self.flag(command, "starts an interactive interpreter", UNDECIDED)]

    def script(self, command, word):
        """Running a script file: the project's own code, or not."""
        out = []
        for value in word.values:
            for cwd in command.cwds:
                path = self.context.resolve(value, None if cwd == UNKNOWN else cwd)
                if path in self.downloaded:
                    return [self.flag(command, "runs a file it has just downloaded")]
                if path is None or not known(path):
                    out.append(self.flag(command, "runs a script the server cannot "
                                                  "resolve", UNDECIDED))
                elif not (self.context.in_trusted(path) or self.context.in_scratch(path)):
                    out.append(self.flag(command, "runs a script outside the working "
                                                  "directories", UNDECIDED))
        return out or [Effect("run", _text(command), SAFE, "")]

    def python_module(self, command, module, rest):
        name = (module.text or "").split(".")[0]
        full = module.text or ""
        if full == "pip":
            return self.routine(command, "pip", list(rest))
        if full in ("http.server", "SimpleHTTPServer") and not any(
                (w.text or "") in ("--bind", "-b") for w in rest):
            return [self.flag(command, "serves the working directory to the whole network",
                              UNDECIDED)]
        if name == "twine" and rest and rest[0].text == "upload":
            return [self.flag(command, "publishes a package to PyPI")]
        if name in PYTHON_MODULES or name in ROUTINE:
            return [Effect("run", _text(command), SAFE, "")]
        return [self.flag(command, f"runs the Python module {full}", UNDECIDED)]

    def package_runner(self, command, name, args):
        rest = [w for w in args if not (w.text or "").startswith("-")]
        if name == "pipx":
            rest = rest[1:]
        tool = (rest[0].text or "") if rest else ""
        tool = tool.split("@")[0] if not tool.startswith("@") else tool
        if tool in ROUTINE or tool in KNOWN_PACKAGES:
            return [Effect("run", _text(command), SAFE, "")]
        return [self.flag(command, "runs a package fetched from the registry", UNDECIDED)]

    def routine(self, command, name, args):
        text = _text(command)
        out = [Effect("run", text, SAFE, "")]
        options = [w.text or "" for w in args]
        subs = ROUTINE.get(name, set())
        sub = next((o for o in options if not o.startswith("-")), None) if name not in (
            "dpkg", "rpm", "crontab", "ssh-keygen", "service") else (options[:1] or [None])[0]
        if (name, sub) in FLAGGED_SUBCOMMANDS:
            return [self.flag(command, FLAGGED_SUBCOMMANDS[(name, sub)])]
        if name == "crontab" and sub != "-l":
            return [self.flag(command, "changes the user's scheduled jobs")]
        if subs and sub not in subs and not (sub is None and name in ("npm", "yarn", "pnpm",
                                                                        "bun", "go", "cargo")):
            return [self.flag(command, "runs a subcommand the server's policy does not "
                                       "know", UNDECIDED)]
        if name in ("npm", "pnpm", "yarn", "bun") and set(options) & {"-g", "--global",
                                                                    "--location=global"}:
            return [self.flag(command, "installs packages globally, outside the project")]
        if name in ("pip", "pip3", "uv") and set(options) & {"--user",
                                                             "--break-system-packages",
                                                             "--system", "--root",
                                                             "--prefix", "--target"}:
            return [self.flag(command, "installs packages outside the project's "
                                       "environment")]
        if name in ("docker", "podman") and sub in ("run", "exec", "create"):
            risky = {"--privileged", "--pid=host", "--cap-add=ALL", "--cap-add=SYS_ADMIN"}
            mounts = [options[j + 1] for j, o in enumerate(options[:-1])
                      if o in ("-v", "--volume", "--mount")]
            mounts += [o.split("=", 1)[1] for o in options if o.startswith(("--volume=",
                                                                            "-v="))]
            if set(options) & risky or any(m.split(":")[0] in ("/", "/etc", "/root",
                                                             "/var/run/docker.sock",
                                                             "/run/docker.sock")
                                           or m.split(":")[0].rstrip("/") in ("~", "/home")
                                           for m in mounts):
                return [self.flag(command, "gives a container control of the host")]
        if name in ("kill", "pkill", "killall") and any(o in ("1", "-1") for o in options):
            return [self.flag(command, "signals every process or the init process")]
        if name == "sed":
            if any(o == "-i" or o.startswith(("-i", "--in-place")) for o in options):
                return out + [e for w in _operands(args)[1:] for e in
                              self.paths(command, w, "write")]
            return out + [e for w in _operands(args)[1:] for e in
                          self.paths(command, w, "read")]
        if name in ("awk", "gawk", "mawk"):
            program = next((w for w in args if not (w.text or "").startswith("-")), None)
            if program is not None and (program.text is None or
                                        any(t in program.text for t in
                                            ("system(", "| getline", '|"', "| \"", "> \"",
                                             '>"', ">>"))):
                return [self.flag(command, "runs an awk program that runs commands or "
                                           "writes files", UNDECIDED)]
            return out
        if name == "tee":
            return out + [e for w in _operands(args) for e in self.paths(command, w, "write")]
        if name in ("cp", "install", "rsync"):
            operands = _operands(args)
            return out + [e for w in operands[:-1] for e in self.paths(command, w, "read")] \
                + [e for w in operands[-1:] for e in self.paths(command, w, "write")]
        if name == "mv":
            operands = _operands(args)
            return out + [e for w in operands[:-1] for e in self.paths(command, w, "delete")] \
                + [e for w in operands[-1:] for e in self.paths(command, w, "write")]
        if name == "ln":
            operands = _operands(args)
            symbolic = any(o.startswith("-") and "s" in o for o in options)
            if symbolic and len(operands) >= 2:
                for target in operands[0].values:
                    for cwd in command.cwds:
                        path = self.context.resolve(target, None if cwd == UNKNOWN else cwd)
                        if path is None or not (self.context.in_trusted(path)
                                                or self.context.in_scratch(path)):
                            return [self.flag(command, "links to a place outside the working "
                                                       "directories, which later edits "
                                                       "through the link would reach")]
            return out + [e for w in operands[-1:] for e in self.paths(command, w, "write")]
        if name == "dd":
            for word in args:
                key, _, value = (word.text or "").partition("=")
                if key == "of":
                    out += self.paths(command, _word(value), "write")
                elif key == "if":
                    out += self.paths(command, _word(value), "read")
            return out
        if name in ("tar", "unzip", "7z", "zip"):
            for j, option in enumerate(options[:-1]):
                if option in ("-C", "--directory", "-d", "-f", "--file"):
                    out += self.paths(command, args[j + 1], "write")
            return out
        if name in ("gcc", "g++", "cc", "c++", "clang", "clang++", "rustc", "nvcc", "go",
                    "javac", "zig"):
            for j, option in enumerate(options[:-1]):
                if option in ("-o", "--out-dir", "-d"):
                    out += self.paths(command, args[j + 1], "write")
        if name in CHANGERS:
            out += [e for w in _operands(args) for e in self.paths(command, w, "write")]
        return out

    def permissions(self, command, name, args):
        operands = _operands(args)
        if name == "chmod" and operands:
            mode = operands[0].text or ""
            if "s" in mode.split("=")[-1] and "+" in mode or \
                    (mode.isdigit() and len(mode) == 4 and mode[0] in "2467"):
                return [self.flag(command, "sets the setuid or setgid bit")]
            operands = operands[1:]
        elif operands:
            operands = operands[1:]  # the owner
        return [Effect("run", _text(command), SAFE, "")] + \
            [e for w in operands for e in self.paths(command, w, "write")]

    def services(self, command, name, args):
        options = [w.text or "" for w in args]
        words = [o for o in options if not o.startswith("-")]
        action = words[0] if words else None
        if name == "service" and len(words) >= 2:
            unit, action = words[0], words[1]
        else:
            unit = words[1] if len(words) > 1 else ""
        unit = unit.removesuffix(".service")
        if action in ROUTINE[name] or action in ("status", "list", "print") or not words:
            return [Effect("run", _text(command), SAFE, "")]
        if unit in SECURITY_SERVICES and action in ("stop", "disable", "mask", "kill",
                                                    "unload", "bootout"):
            return [self.flag(command, "disables a security service")]
        return [self.flag(command, "changes the system's services")]


def _text(command):
    return " ".join(w.values[0] if w.values else "" for w in command.words)


def _word(value):
    return Word((value,))


def _operands(words):
    """Arguments that are not options (everything after ``--`` is one)."""
    out, rest = [], False
    for word in words:
        text = word.text
        if rest or text is None or not text.startswith("-") or text == "-":
            out.append(word)
        elif text == "--":
            rest = True
    return out


def _glob_place(path):
    """A deletion pattern, as the place it reaches: ``dir/*`` reaches
    everything in dir (kept as ``dir/*``), ``dir/*.o`` somewhere in dir."""
    head, _, tail = path.rpartition("/")
    if tail in ("*", ".*"):
        return path
    if any(c in head for c in "*?["):
        return head.split("*")[0].rstrip("/") + "/" + BELOW
    return (head or "") + "/" + BELOW if any(c in tail for c in "*?[") else path


def _is_remote(operand):
    """``host:path``, ``user@host:path``, ``host::module`` or ``rsync://``."""
    return re.match(r"[\w.@-]+:", operand) is not None or operand.startswith("rsync://")


def _downloads(word):
    """Whether a word's value comes from a download (``$(curl …)``, ``<(wget …)``)."""
    return any(base_name(c.name) in DOWNLOADERS for sub in word.subs for c in sub)


def _reads_code_from_stdin(command):
    name = base_name(command.name)
    if name in ("eval", "source", "."):
        return True
    if name not in INTERPRETERS:
        return False
    operands = [w.text for w in command.words[1:] if not (w.text or "-").startswith("-")
                or w.text == "-"]
    flag = INTERPRETERS.get(name)
    has_code = any((w.text or "") == flag for w in command.words[1:]) if flag else False
    return not has_code and (not operands or operands[0] == "-")


def _python_problem(code):
    """Why inline Python is not plainly harmless, or None: it is parsed,
    and imports, calls and attributes that reach the system are named."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return "the server cannot parse"
    stdlib = getattr(sys, "stdlib_module_names", set())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            for module in names:
                top = module.split(".")[0]
                if top == "os" and module in ("os", "os.path"):
                    continue
                if top in NETWORK_PACKAGES or (top in stdlib and top not in PURE_MODULES):
                    return f"imports {module}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else None
            if name in ("exec", "eval", "compile", "__import__", "system", "popen",
                        "remove", "unlink", "rmdir", "rmtree", "rename", "replace",
                        "write_text", "write_bytes", "chmod", "symlink_to", "spawn"):
                return f"calls {name}()"
            if name == "open" and _writes(node):
                return "opens a file for writing"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "os" and node.attr not in OS_READS:
            return f"uses os.{node.attr}"
    return None


def _writes(call):
    modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
    for mode in modes:
        if not isinstance(mode, ast.Constant) or not isinstance(mode.value, str):
            return True
        if set(mode.value) & set("wax+"):
            return True
    return False
