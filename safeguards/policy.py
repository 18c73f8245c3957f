"""The built-in auto-mode policy: its tables (commands by kind, the paths
that hold credentials or run on their own, Claude Code's session tools, ...)
as data, the verdict and effect types the judge works with, and the policy
on reading, writing or deleting a path and fetching from a host. What shell
commands do: ``effects``; the judge that puts rules and policy together:
``judge``."""

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from safeguards import rules as R
from safeguards.paths import UNKNOWN, inside, known, shown
from safeguards.walk import SHELLS

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


# === Paths and hosts ==========================================================


def fetch_effect(url, context):
    if not isinstance(url, str):
        return Effect("fetch", None, UNDECIDED, "fetches no readable URL", "WebFetch", False)
    parts = urlsplit(url.strip())
    if parts.scheme == "file":
        return path_effect("read", context.resolve(parts.path), context, "WebFetch")
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


def path_effect(kind, path, context, tool="Bash", shell=False, source=None):
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
