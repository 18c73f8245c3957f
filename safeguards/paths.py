"""Paths as the auto-mode judge compares them: made absolute and normalised
lexically (``~``, ``.``, ``..``), nothing read from the disk. A path may hold
the shell walk's markers: ``UNKNOWN`` (text nobody can know here, which may
even be ``../..``) and ``BELOW`` (some entry at or below the directory before
it, as a ``find`` turns up)."""

import posixpath

UNKNOWN = "\x00"
BELOW = "\x01"


def resolve(path, cwd, home):
    """``path`` made absolute against ``cwd`` and normalised; None when
    nothing about its place is known (it starts with unknown text, or is
    relative to an unknown directory). Components after an unknown one are
    dropped: the path is then "somewhere, starting from here"."""
    if not isinstance(path, str) or not path or path.startswith(UNKNOWN):
        return None
    if path == "~" or path.startswith("~/"):
        if not home:
            return None
        path = home + path[1:]
    elif path.startswith("~"):
        return None  # ~user: another account's home
    if not path.startswith("/"):
        if not cwd or cwd.startswith(UNKNOWN):
            return None
        path = cwd + "/" + path
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if UNKNOWN in part:
            parts.append(UNKNOWN)
            break
        if part == "..":
            # Above the root is the root; above "something below" is
            # still somewhere below.
            if parts and parts[-1] != BELOW:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def known(path):
    """Whether every component of a resolved path is known."""
    return path is not None and UNKNOWN not in path


def inside(path, root, fold_case=False):
    """Whether a resolved path is ``root`` or below it for certain: an
    unknown component could climb out, ``BELOW`` cannot."""
    if path is None or UNKNOWN in path or not root:
        return False
    if fold_case:
        path, root = path.lower(), root.lower()
    root = root.rstrip("/") or "/"
    return root == "/" or path == root or path.startswith(root + "/")


def parent(path):
    return posixpath.dirname(path) if path else None


def shown(path):
    """A resolved path as a person reads it."""
    return path.replace(UNKNOWN, "…").replace(BELOW, "…")
