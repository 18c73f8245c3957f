"""The auto-mode judge: one tool call, in the session's context, to a verdict.

A call is first taken apart into its effects (a command run, a file read,
written or deleted, a host fetched from or sent to, a tool called); shell
text through ``shell``. Each effect is decided by the user's rules first
(deny, auto-mode hard deny, ask, auto-mode soft deny: flagged, citing the
rule; then allow rules: not flagged), else by the built-in policy below,
whose tables are data. The call is flagged if any effect is; not flagged if
every effect is allowed or known to be safe; otherwise undecided, which is
flagged with the permission rule that would allow it (``by="default"``)."""

import ast
import fnmatch
import re
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from safeguards import rules as R
from safeguards.paths import BELOW, UNKNOWN, inside, known, shown
from safeguards.shell import SHELLS, ShellError, Word, commands

# === The policy, as data ========================================================

# Commands that only read: their operands, if any, are files read.
READERS = set("""
ls ll la dir vdir cat bat batcat head tail less more most wc grep egrep fgrep rg ag ack fd
fdfind tree du file stat diff colordiff cmp sort uniq cut tr column jq yq xq strings nl tac rev
fold fmt paste join comm xxd hexdump od base64 base32 md5sum sha1sum sha224sum sha256sum
sha384sum sha512sum shasum cksum b2sum sum iconv look zcat zless zgrep bzcat xzcat lzcat
readlink realpath find locate mdfind lsattr getfacl identify exiftool pdftotext wc
""".split())
# Commands that read nothing of note and write nothing.
QUIET = set("""
echo printf true false test [ [[ seq sleep bc dc expr date cal whoami id groups uname hostname
uptime ps pgrep pidof free nproc lscpu lsblk lsusb lspci lsmod basename dirname pwd which
whereis type hash man info help tldr apropos whatis locale tty printenv env clear reset tput
wait jobs : let shift exit return break continue set shopt ulimit umask alias unalias trap
getconf lsof netstat ss ip ifconfig dig nslookup host ping traceroute tracepath mtr whois
nvidia-smi top htop btop vmstat iostat mpstat sw_vers system_profiler sysctl arch uname
mktemp yes tee-dry-run source . cd pushd popd export declare typeset local readonly unset
read mapfile readarray getopts history dirs disown fc logname users w who last df
pbpaste pbcopy xclip xsel notify-send say osascript-dry-run time times command builtin
""".split()) - {"osascript-dry-run", "tee-dry-run"}
# Commands whose operands are files they delete, create or change in place.
DELETERS = {"rm", "rmdir", "unlink", "shred", "srm", "trash", "trash-put", "gio-trash"}
MAKERS = {"mkdir", "touch", "truncate", "mkfifo"}
CHANGERS = {"chmod", "chown", "chgrp", "chattr", "setfacl", "xattr", "touch", "dos2unix",
            "unix2dos", "patch", "gzip", "gunzip", "bzip2", "bunzip2", "xz", "unxz",
            "zstd", "unzstd", "lz4", "shfmt", "prettier", "black", "isort", "rustfmt",
            "gofmt", "clang-format", "autopep8", "yapf"}
# Interpreters: the flag that takes inline code.
INTERPRETERS = {"python": "-c", "python3": "-c", "python2": "-c", "pypy": "-c", "pypy3": "-c",
                "node": "-e", "nodejs": "-e", "ruby": "-e",
                "perl": "-e", "php": "-r", "lua": "-e", "Rscript": "-e", "julia": "-e",
                "pwsh": "-c", "powershell": "-c", "osascript": "-e", "tclsh": None,
                "groovy": "-e"}
INTERPRETERS.update({shell: "-c" for shell in SHELLS})
DOWNLOADERS = {"curl", "wget", "http", "https", "xh", "aria2c", "fetch", "lynx", "links"}
# The project's own tools: tests, builds, linters, formatters, compilers.
# An empty set: any arguments; otherwise the subcommands that are routine.
ROUTINE = {
    "make": set(), "gmake": set(), "cmake": set(), "ctest": set(), "ninja": set(),
    "meson": set(), "bazel": set(), "bazelisk": set(), "buck2": set(), "scons": set(),
    "gradle": set(), "gradlew": set(), "mvn": set(), "mvnw": set(), "ant": set(),
    "sbt": set(), "lein": set(), "mix": set(), "rebar3": set(), "stack": set(),
    "cabal": set(), "dune": set(), "opam": {"exec", "list", "env"},
    "pytest": set(), "py.test": set(), "tox": set(), "nox": set(), "coverage": set(),
    "mypy": set(), "pyright": set(), "ruff": set(), "flake8": set(), "pylint": set(),
    "black": set(), "isort": set(), "autopep8": set(), "yapf": set(), "bandit": set(),
    "pre-commit": {"run", "install", "autoupdate", "clean"}, "pyflakes": set(),
    "pycodestyle": set(), "pydocstyle": set(), "vulture": set(), "radon": set(),
    "tsc": set(), "eslint": set(), "prettier": set(), "biome": set(), "jest": set(),
    "vitest": set(), "mocha": set(), "ava": set(), "tap": set(), "karma": set(),
    "playwright": {"test", "show-report", "codegen", "install"}, "cypress": {"run", "open"},
    "webpack": set(), "vite": set(), "esbuild": set(), "rollup": set(), "parcel": set(),
    "turbo": set(), "nx": set(), "lerna": {"run", "list", "ls", "bootstrap"},
    "stylelint": set(), "tslint": set(), "standard": set(), "xo": set(),
    "rustc": set(), "rustfmt": set(), "gcc": set(), "g++": set(), "cc": set(), "c++": set(),
    "clang": set(), "clang++": set(), "clang-format": set(), "clang-tidy": set(),
    "javac": set(), "kotlinc": set(), "scalac": set(), "ghc": set(), "nvcc": set(),
    "zig": {"build", "test", "run", "fmt", "version", "cc", "c++"}, "gofmt": set(),
    "goimports": set(), "golangci-lint": set(), "staticcheck": set(), "shellcheck": set(),
    "shfmt": set(), "hadolint": set(), "yamllint": set(), "markdownlint": set(),
    "actionlint": set(), "jsonlint": set(), "cppcheck": set(), "valgrind": set(),
    "gdb": set(), "lldb": set(), "strace": set(), "ltrace": set(), "perf": set(),
    "hyperfine": set(), "tar": set(), "zip": set(), "unzip": set(), "7z": set(),
    "sed": set(), "awk": set(), "gawk": set(), "mawk": set(), "tee": set(), "cp": set(),
    "mv": set(), "ln": set(), "install": set(), "rsync": set(), "dd": set(),
    "rake": set(), "rspec": set(), "rubocop": set(), "phpunit": set(), "composer":
        {"install", "update", "require", "dump-autoload", "test", "run-script", "validate"},
    "dotnet": {"build", "test", "run", "restore", "format", "clean", "new", "add", "list",
               "--version", "--info", "sln", "watch", "pack"},
    "swift": {"build", "test", "run", "package", "format", "--version"},
    "xcodebuild": set(), "xcrun": set(), "swiftlint": set(), "swiftformat": set(),
    "go": {"build", "test", "vet", "fmt", "run", "mod", "get", "list", "env", "version",
           "doc", "generate", "tool", "work", "clean", "install", "help"},
    "cargo": {"build", "b", "test", "t", "check", "c", "clippy", "fmt", "run", "r", "doc",
              "bench", "clean", "add", "remove", "rm", "update", "tree", "metadata", "new",
              "init", "fetch", "vendor", "nextest", "expand", "--version", "version",
              "search", "locate-project", "pkgid", "fix", "help", "llvm-cov", "miri"},
    "npm": {"test", "t", "tst", "run", "run-script", "start", "stop", "restart", "build",
            "install", "i", "ci", "add", "uninstall", "remove", "rm", "un", "update", "up",
            "outdated", "ls", "list", "ll", "audit", "init", "create", "pack", "why",
            "explain", "info", "view", "show", "help", "prune", "dedupe", "fund", "doctor",
            "version", "--version", "-v", "exec", "x", "query", "search", "rebuild",
            "install-test", "it", "cit", "pkg", "config", "root", "prefix", "bin"},
    "pnpm": {"test", "t", "run", "start", "build", "install", "i", "add", "remove", "rm",
             "update", "up", "outdated", "ls", "list", "audit", "init", "create", "why",
             "exec", "dlx", "dedupe", "prune", "store", "--version", "-v", "fetch",
             "rebuild", "lint", "format", "typecheck", "dev", "info", "view"},
    "yarn": {"test", "run", "start", "build", "install", "add", "remove", "upgrade", "up",
             "outdated", "list", "why", "info", "init", "create", "exec", "dlx", "audit",
             "dedupe", "--version", "-v", "lint", "format", "typecheck", "dev", "workspace",
             "workspaces", "set", "config", "node", "bin", "cache", "check", "constraints"},
    "bun": {"test", "run", "install", "i", "add", "remove", "rm", "update", "outdated",
            "build", "init", "create", "x", "pm", "--version", "-v", "dev", "lint"},
    "deno": {"test", "run", "fmt", "lint", "check", "task", "bench", "doc", "info",
             "compile", "cache", "--version", "coverage"},
    "pip": {"install", "uninstall", "list", "show", "freeze", "download", "wheel", "check",
            "--version", "-V", "help", "inspect", "index", "cache", "config", "debug"},
    "pipx": {"list", "run", "install", "--version"},
    "uv": {"sync", "add", "remove", "lock", "pip", "venv", "build", "tree", "export",
           "--version", "version", "python", "init", "cache", "tool", "self", "format"},
    "poetry": {"install", "add", "remove", "lock", "update", "show", "check", "build",
               "env", "version", "--version", "init", "new", "config", "export", "shell"},
    "pdm": {"install", "add", "remove", "lock", "update", "list", "build", "sync"},
    "hatch": {"build", "test", "env", "fmt", "version", "shell"},
    "bundle": {"install", "update", "check", "list", "show", "outdated", "config", "add",
               "lock", "init", "binstubs", "clean", "--version"},
    "gem": {"install", "list", "search", "info", "uninstall", "build", "--version"},
    "conda": {"install", "list", "create", "env", "info", "search", "update", "remove",
              "activate", "deactivate", "--version"},
    "docker": {"ps", "images", "image", "logs", "inspect", "build", "buildx", "pull", "compose",
               "run", "exec", "start", "stop", "restart", "create", "cp", "tag", "version",
               "info", "stats", "top", "port", "diff", "history", "events", "network",
               "container", "context", "search", "login", "rm", "kill", "wait", "attach"},
    "docker-compose": {"up", "down", "build", "logs", "ps", "run", "exec", "pull", "start",
                       "stop", "restart", "config", "top", "images", "version", "rm"},
    "podman": {"ps", "images", "logs", "inspect", "build", "pull", "run", "exec", "start",
               "stop", "restart", "create", "cp", "tag", "version", "info", "rm"},
    "kubectl": {"get", "describe", "logs", "top", "explain", "version", "api-resources",
                "api-versions", "cluster-info", "diff", "auth", "events"},
    "helm": {"list", "ls", "status", "get", "show", "template", "lint", "version",
             "dependency", "repo", "search", "history", "env"},
    "terraform": {"fmt", "validate", "init", "plan", "show", "output", "providers",
                  "version", "graph", "console", "get", "workspace", "-version", "--version"},
    "tofu": {"fmt", "validate", "init", "plan", "show", "output", "providers", "version"},
    "gh": {"pr", "issue", "repo", "run", "workflow", "release", "api", "auth", "browse",
           "search", "status", "--version", "label", "cache", "codespace", "gist", "help"},
    "brew": {"list", "info", "search", "--version", "outdated", "deps", "config", "doctor",
             "leaves", "uses", "home", "desc"},
    "apt": {"list", "search", "show", "policy", "--version"},
    "apt-cache": set(), "dpkg": {"-l", "-L", "-s", "--list", "--listfiles", "--status",
                                 "-S", "--search", "--version"},
    "rpm": {"-q", "-qa", "-qi", "-ql", "-qf", "--query", "--version"},
    "systemctl": {"status", "is-active", "is-enabled", "is-failed", "list-units",
                  "list-unit-files", "list-timers", "show", "cat", "--version", "help"},
    "journalctl": set(), "launchctl": {"list", "print", "version", "help"},
    "service": {"--status-all"}, "kill": set(), "pkill": set(), "killall": set(),
    "crontab": {"-l"}, "git-lfs": set(), "openssl": {"version", "x509", "verify", "dgst",
                                                     "rand", "s_client", "help"},
    "ssh-keygen": {"-l", "-lf", "-F", "-y"}, "code": set(), "cursor": set(), "vim": set(),
    "vi": set(), "nvim": set(), "nano": set(), "emacs": set(), "open": set(),
    "xdg-open": set(), "jupyter": {"nbconvert", "notebook", "lab", "kernelspec", "--version"},
    "sqlite3": set(), "psql": set(), "mysql": set(), "redis-cli": set(), "mongosh": set(),
    "sam": {"build", "validate", "local"}, "ollama": {"list", "ps", "show", "run", "pull"},
}
# Subcommands that are flagged whatever else the call does, with why.
FLAGGED_SUBCOMMANDS = {
    ("npm", "publish"): "publishes a package to the public registry",
    ("npm", "unpublish"): "removes a published package from the registry",
    ("npm", "deprecate"): "changes a published package on the registry",
    ("pnpm", "publish"): "publishes a package to the public registry",
    ("yarn", "publish"): "publishes a package to the public registry",
    ("bun", "publish"): "publishes a package to the public registry",
    ("cargo", "publish"): "publishes a crate to crates.io",
    ("cargo", "yank"): "yanks a published crate version",
    ("cargo", "owner"): "changes the owners of a published crate",
    ("poetry", "publish"): "publishes a package to PyPI",
    ("uv", "publish"): "publishes a package to PyPI",
    ("twine", "upload"): "publishes a package to PyPI",
    ("gem", "push"): "publishes a gem",
    ("terraform", "destroy"): "destroys the infrastructure it manages",
    ("tofu", "destroy"): "destroys the infrastructure it manages",
    ("kubectl", "delete"): "deletes resources from a cluster",
    ("helm", "uninstall"): "removes a release from a cluster",
    ("docker", "system"): "prunes Docker's images, containers or volumes",
    ("docker", "volume"): "changes or deletes Docker volumes, which hold data",
    ("crontab", "-r"): "deletes every scheduled job of the user",
    ("gh", "secret"): "reads or changes the repository's secrets",
}
# Paths that hold credentials and keys (flagged wherever they are).
CREDENTIALS = (
    "~/.ssh/**", "~/.aws/**", "~/.gnupg/**", "~/.netrc", "~/.git-credentials",
    "~/.config/gh/hosts.yml", "~/.docker/config.json", "~/.kube/**", "~/.config/gcloud/**",
    "~/.azure/**", "~/.npmrc", "~/.pypirc", "~/.password-store/**", "~/.local/share/keyrings/**",
    "~/Library/Keychains/**", "~/.claude/.credentials.json", "~/.config/op/**",
    "~/.vault-token", "~/.terraform.d/credentials.tfrc.json", "~/.cargo/credentials*",
    "~/.gem/credentials", "~/.m2/settings.xml", "~/.pgpass", "~/.my.cnf",
    "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d/**", "/etc/ssh/*_key",
    "/root/.ssh/**", "/var/run/secrets/**",
)
# Key files by name: flagged outside the trusted directories.
KEY_NAMES = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.pem", "*.key", "*.p12",
             "*.pfx", "*.jks", "*.keystore", "*.kdbx", ".env", ".env.*")
# Files that run on their own later: shell start-up, scheduled jobs, services.
STARTUP = ("~/.bashrc", "~/.bash_profile", "~/.bash_login", "~/.profile", "~/.zshrc",
           "~/.zprofile", "~/.zshenv", "~/.zlogin", "~/.config/fish/**", "~/.ssh/authorized_keys",
           "~/.config/autostart/**", "~/Library/LaunchAgents/**", "/etc/**", "/Library/**",
           "/var/spool/cron/**", "~/.gitconfig", "~/.config/git/**")
# Inside a trusted directory, files that steer git or the agent itself.
STEERING = ((".git", "writes inside .git, whose hooks and config run commands"),
            (".claude/settings.json", "changes the agent's own permission settings"),
            (".claude/settings.local.json", "changes the agent's own permission settings"),
            (".mcp.json", "changes which MCP servers the agent runs"))
HARMLESS_FILES = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/fd/**",
                  "/dev/zero", "/dev/random", "/dev/urandom", "/proc/self/fd/**")
# Commands flagged outright, with why.
FLAGGED_COMMANDS = {
    **{name: "runs a command with elevated privileges" for name in
       ("sudo", "doas", "su", "pkexec", "runas", "gosu", "run0")},
    **{name: "formats or repartitions a disk" for name in
       ("mkfs", "mke2fs", "mkswap", "fdisk", "sfdisk", "gdisk", "parted", "wipefs", "diskutil")},
    **{name: "opens a raw network connection that can carry local data anywhere"
       for name in ("nc", "ncat", "netcat", "socat", "telnet", "ftp", "sftp", "tftp")},
    **{name: "stops or restarts the machine" for name in
       ("shutdown", "reboot", "halt", "poweroff", "init")},
    **{name: "changes user accounts or passwords" for name in
       ("useradd", "userdel", "usermod", "passwd", "chpasswd", "adduser", "deluser",
        "groupadd", "groupdel", "visudo", "dscl")},
    **{name: "changes the firewall" for name in
       ("iptables", "ip6tables", "nft", "ufw", "firewall-cmd", "pfctl")},
    **{name: "disables a security control of the system" for name in
       ("setenforce", "csrutil", "spctl", "aa-disable", "aa-complain", "auditctl")},
    "mount": "mounts a file system", "umount": "unmounts a file system",
    "at": "schedules a command to run later", "batch": "schedules a command to run later",
    "insmod": "loads a kernel module", "rmmod": "unloads a kernel module",
    "modprobe": "loads a kernel module", "chroot": "runs a command in another root",
    "nsenter": "enters another process's namespaces", "scp": None, "ssh": None,
}
SECURITY_SERVICES = {"firewalld", "ufw", "apparmor", "auditd", "selinux", "fail2ban",
                     "clamav", "clamd", "falcon-sensor", "osqueryd", "crowdstrike",
                     "sshguard", "wazuh-agent", "com.apple.alf"}
# Tools of Claude Code that act only inside the session.
SESSION_TOOLS = {
    "Agent": "starts a sub-agent, whose own calls are checked",
    "Task": "starts a sub-agent, whose own calls are checked",
    "TodoWrite": "updates the session's task list", "TodoRead": "reads the task list",
    "ToolSearch": "loads tool definitions", "AskUserQuestion": "asks the user",
    "ExitPlanMode": "presents a plan", "EnterPlanMode": "enters plan mode",
    "ListAgents": "lists agents", "ReportFindings": "reports review findings",
    "ScheduleWakeup": "paces the session's own loop", "SendMessage": "messages an agent",
    "TaskStop": "stops a background task", "TaskOutput": "reads a background task",
    "BashOutput": "reads a background shell", "KillShell": "stops a background shell",
    "KillBash": "stops a background shell", "CronList": "lists scheduled prompts",
    "CronDelete": "deletes a scheduled prompt", "WebSearch": "searches the web",
    "EnterWorktree": "moves into a git worktree", "ExitWorktree": "leaves a git worktree",
    "ListMcpResourcesTool": "lists MCP resources", "Skill": "loads a skill's instructions",
    "SlashCommand": "runs one of the user's slash commands",
}
PURE_MODULES = set("""
json sys math re datetime time collections itertools functools string textwrap platform random
statistics decimal fractions pprint base64 hashlib hmac uuid struct typing dataclasses enum
operator heapq bisect calendar locale unicodedata difflib csv glob fnmatch copy numbers abc
keyword ast tokenize shlex zlib binascii codecs array contextlib types warnings traceback
sysconfig io this secrets colorsys graphlib zoneinfo inspect importlib __future__ doctest
""".split())
NETWORK_PACKAGES = {"requests", "httpx", "aiohttp", "urllib3", "paramiko", "boto3",
                    "botocore", "fabric", "pexpect", "sh", "plumbum", "websocket",
                    "websockets", "socketio", "scapy", "pycurl", "psutil", "docker"}
OS_READS = {"path", "getcwd", "environ", "getenv", "listdir", "cpu_count", "sep", "linesep",
            "name", "getpid", "uname", "stat", "scandir", "walk", "pathsep", "curdir",
            "fspath", "get_terminal_size", "devnull", "getuid", "getlogin", "access"}
LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "[::1]", "host.docker.internal"}
METADATA_HOSTS = {"169.254.169.254", "metadata.google.internal", "100.100.100.200",
                  "fd00:ec2::254", "169.254.170.2"}

# === Verdicts ===================================================================

FLAGGED, NOT_FLAGGED = "flagged", "not_flagged"
# How strong a finding is, strongest first.
RULE_FLAG, POLICY_FLAG, UNDECIDED, ALLOWED, SAFE = range(5)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "flagged" or "not_flagged"
    explanation: str = ""
    rule: str | None = None  # the cited rule's path in classifier_context
    by: str = "policy"  # "rule", "policy", or "default" (nothing decided)


@dataclass(frozen=True)
class Effect:
    """One thing a call does; ``level`` and ``why`` are the policy's view."""

    kind: str  # run, read, write, delete, fetch, send, call
    target: str | None  # the command text, resolved path, host, or tool name
    level: int
    why: str  # for a flag: what it does, as a clause ("deletes /etc")
    tool: str = "Bash"  # the tool the call went to
    shell: bool = True  # found in shell text (a path rule then binds only to stop it)
    detail: str | None = None  # a sub-agent's type, or the command a path is from

    @property
    def allow_hint(self):
        if self.kind == "run":
            words = (self.target or "").split()
            prefix = " ".join(words[:2] if len(words) > 1 and not words[1].startswith("-")
                              else words[:1])
            return f"Bash({prefix}:*)" if prefix else "Bash"
        if self.kind in ("read", "write", "delete") and self.target:
            family = "Read" if self.kind == "read" else "Edit"
            return f"{family}(/{shown(self.target)})"
        if self.kind in ("fetch", "send"):
            return f"WebFetch(domain:{self.target})" if self.tool == "WebFetch" else "Bash(...)"
        return self.tool


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
        return [_path_effect("read", context.resolve(path), context, name)]
    if name in R.EDIT_TOOLS:
        path = _first_string(data, "file_path", "notebook_path")
        return [_path_effect("write", context.resolve(path) if path else None, context, name)]
    if name == "WebFetch":
        return [_fetch_effect(data.get("url"), context)]
    if name in SESSION_TOOLS:
        detail = data.get("subagent_type") if isinstance(data.get("subagent_type"), str) \
            else None
        return [Effect("call", name, SAFE, SESSION_TOOLS[name], name, False, detail)]
    return [Effect("call", name, UNDECIDED, "calls a tool whose effects the server does "
                                            "not know", name, False)]


def _first_string(data, *keys):
    return next((data[k] for k in keys if isinstance(data.get(k), str) and data[k]), None)


def _fetch_effect(url, context):
    if not isinstance(url, str):
        return Effect("fetch", None, UNDECIDED, "fetches no readable URL", "WebFetch", False)
    parts = urlsplit(url.strip())
    if parts.scheme == "file":
        return _path_effect("read", context.resolve(parts.path), context, "WebFetch")
    host = (parts.hostname or "").lower()
    if host in METADATA_HOSTS:
        return Effect("fetch", host, POLICY_FLAG, "reads the cloud metadata service, which "
                                                  "hands out credentials", "WebFetch", False)
    return Effect("fetch", host, SAFE, "", "WebFetch", False)


def _matches_any(path, patterns, context):
    """Whether a resolved path is one of ``patterns`` (absolute or ``~/``)."""
    if path is None or UNKNOWN in path:
        return False
    return any(R.matches_path(R.Rule("", "", "Read", "/" + p if p.startswith("/") else p),
                              path, context) for p in patterns)


def _named(path, patterns):
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _path_effect(kind, path, context, tool="Bash", shell=False, source=None):
    """The policy on reading, writing or deleting one resolved path
    (``source``: the shell command it comes from)."""
    def effect(level, why=""):
        return Effect(kind, path, level, why, tool, shell, source)
    if path is not None and _matches_any(path, HARMLESS_FILES, context):
        return effect(SAFE)
    if path is None or not known(path):
        if kind == "read":
            return effect(UNDECIDED if context.block_reads else SAFE,
                          "reads a path the server cannot resolve")
        return effect(UNDECIDED, f"{_VERBS[kind]} a path that depends on text the server "
                                 f"cannot resolve")
    place = shown(path)
    if _matches_any(path, CREDENTIALS, context):
        return effect(POLICY_FLAG, f"{_VERBS[kind]} {place}, which holds credentials or keys")
    trusted = context.in_trusted(path)
    if not trusted and _named(path, KEY_NAMES):
        return effect(POLICY_FLAG, f"{_VERBS[kind]} {place}, a key or secrets file outside "
                                   f"the working directories")
    if kind == "read":
        if context.block_reads and not trusted:
            return effect(POLICY_FLAG, f"reads {place}, outside the working directories, "
                                       f"which this session keeps reads inside")
        return effect(SAFE)
    if path.startswith("/dev/") and not path.startswith("/dev/shm/"):
        return effect(POLICY_FLAG, f"writes the device {place}")
    for root in context.trusted + R.SCRATCH:
        if kind == "delete" and inside(root, path, context.fold_case):
            return effect(POLICY_FLAG, f"deletes {place}, which holds the directory {root}")
        if not inside(path, root, context.fold_case):
            continue
        relative = path[len(root):].lstrip("/")
        if kind == "delete" and relative in ("*", ".*"):
            return effect(POLICY_FLAG, f"deletes everything in {root}")
        folded = relative.lower() if context.fold_case else relative
        for name, why in STEERING if root in context.trusted else ():
            if folded == name or folded.startswith(name + "/"):
                relative = folded
                if re.fullmatch(r"\.git/(.*/)?[^/]*\.lock", relative) and kind == "delete":
                    return effect(SAFE)  # a stale lock left by a crashed git
                if kind == "delete" and relative in (".git", ".git/objects", ".git/refs"):
                    return effect(POLICY_FLAG, "deletes the repository's history (.git)")
                return effect(POLICY_FLAG, why + f" ({place})")
    if trusted or context.in_scratch(path):
        return effect(SAFE)
    if kind == "write" and _matches_any(path, STARTUP, context):
        return effect(POLICY_FLAG, f"{_VERBS[kind]} {place}, which runs on its own later "
                                   f"(start-up, scheduled or system configuration)")
    return effect(POLICY_FLAG, f"{_VERBS[kind]} {place}, outside the working directories")


_VERBS = {"read": "reads", "write": "writes", "delete": "deletes"}


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
            if _base(command.name) in DOWNLOADERS and any(
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
                out.append(_path_effect(kind, path, self.context, "Bash", True,
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
        return out + self.simple(command, _base(command.name))

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
            return self.executable(command, command.name)
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
        out, text = [Effect("run", _text(command), SAFE, "")], _text(command)
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
        i, cwds = 0, command.cwds
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

    def executable(self, command, path_text):
        return self.script(command, command.words[0])

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


ALIASES = {"pip3": "pip", "pip2": "pip", "gradlew": "gradle", "mvnw": "mvn",
           "yarnpkg": "yarn", "docker-compose": "docker-compose"}
GIT_ROUTINE = set("""
status diff log show branch add commit checkout switch restore fetch pull push stash rebase merge
cherry-pick revert tag remote blame grep ls-files ls-tree rev-parse rev-list describe reflog
shortlog worktree submodule init clone apply am format-patch bisect mv rm notes show-ref
cat-file for-each-ref whatchanged archive bundle gc fsck count-objects help version var
check-ignore check-attr sparse-checkout lfs range-diff request-pull maintenance config
mergetool difftool name-rev merge-base symbolic-ref verify-commit verify-tag citool gui
""".split())
PYTHON_MODULES = set("""
pytest unittest venv virtualenv json mypy black ruff build coverage pydoc timeit cProfile
profile compileall py_compile tox flake8 pylint isort doctest pip_audit pyflakes nox
pre_commit ensurepip site sysconfig platform tabnanny trace pdb calendar zipfile tarfile
""".split())
KNOWN_PACKAGES = {"create-react-app", "create-next-app", "create-vite", "degit", "tsx",
                  "ts-node", "next", "nuxt", "astro", "svelte-kit", "sv", "expo",
                  "react-native", "storybook", "husky", "lint-staged", "concurrently",
                  "nodemon", "serve", "http-server", "json-server", "npm-check-updates",
                  "ncu", "depcheck", "knip", "typedoc", "jsdoc", "changeset", "semantic-release",
                  "prisma", "drizzle-kit", "sequelize-cli", "knex", "wrangler", "vercel",
                  "netlify", "firebase", "aws-cdk", "cdk", "openapi-typescript", "tailwindcss",
                  "postcss", "sass", "less", "lessc", "babel", "swc", "tsup", "unbuild",
                  "rimraf", "cross-env", "dotenv", "shx", "markdownlint-cli", "cspell",
                  "ruff", "black", "httpie", "cowsay", "pyright", "pre-commit"}


def _text(command):
    return " ".join(w.values[0] if w.values else "" for w in command.words)


def _base(name):
    return name.rsplit("/", 1)[-1] if name else ""


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
    return any(_base(c.name) in DOWNLOADERS for sub in word.subs for c in sub)


def _reads_code_from_stdin(command):
    name = _base(command.name)
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
