"""DataRoot: where a task's relative data paths point, and — on the server — the fence around them.

`lmforge eval` (the user's own machine) resolves a relative path against `--data-root`, then the task
file's folder (the first that has it); absolute paths are the user's business. The server (`lmforge serve --data-root DIR`)
confines every path a client names to DIR: an absolute path or a `..` component is INVALID_ARGUMENT, and a
path that leaves DIR through a symlink is PERMISSION_DENIED (checked on the fully resolved path, so no
link inside DIR can reach outside it). Globs (`eval/mmlu/test/*.csv`) expand inside the root and every
match is checked the same way. A server without a data root opens no file (FAILED_PRECONDITION).
"""

from __future__ import annotations

import glob
from pathlib import Path, PurePosixPath

from lifecycle.errors import LmforgeError

GLOB_CHARS = set("*?[")


class PathRefused(LmforgeError):
    """A data path the server will not open; `code` is the grpc.StatusCode name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DataRoot:
    def __init__(self, root: str | Path | None, *, confined: bool = False, fallback: str | Path | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.confined = confined
        self.fallback = Path(fallback).resolve() if fallback is not None else None

    def resolve(self, pattern: str, what: str) -> list[Path]:
        """The files `pattern` names (sorted when it is a glob); `what` names it in errors ("data", "task_file")."""
        if self.confined:
            return self._confined(pattern, what)
        path = Path(pattern).expanduser()
        if path.is_absolute():
            bases = [path.parent]
        else:  # the data root first, then the task file's folder: shipped tasks and one's own files both work
            bases = [b for b in (self.root, self.fallback) if b is not None] or [Path.cwd()]
        for base in bases:
            candidate = base / path
            if GLOB_CHARS & set(pattern):
                matches = sorted(Path(p) for p in glob.glob(str(candidate), recursive=True))
                if matches:
                    return matches
            elif candidate.is_file():
                return [candidate]
        tried = " or ".join(str(b / path) for b in bases)
        hint = "" if self.root else " (relative data paths start at --data-root, e.g. ../shared/data)"
        raise LmforgeError(f"{what}: {pattern} matches no file (looked for {tried}){hint}")

    def _confined(self, pattern: str, what: str) -> list[Path]:
        if self.root is None:  # a server without --data-root opens no file at all
            raise PathRefused("FAILED_PRECONDITION", f"{what}: this server has no data root, so it opens no files; "
                                                     "send the records as items, or start it with --data-root DIR")
        if not pattern:
            raise PathRefused("INVALID_ARGUMENT", f"{what}: is empty; name a file under the server's data root")
        pure = PurePosixPath(pattern.replace("\\", "/"))
        if pure.is_absolute() or Path(pattern).is_absolute() or pattern.startswith("~"):
            raise PathRefused("INVALID_ARGUMENT", f"{what}: {pattern!r} is absolute; name a file relative to the "
                                                  "server's data root")
        if ".." in pure.parts:
            raise PathRefused("INVALID_ARGUMENT", f"{what}: {pattern!r} contains '..'; paths stay inside the "
                                                  "server's data root")
        if GLOB_CHARS & set(pattern):
            candidates = sorted(Path(p) for p in glob.glob(str(self.root / pure), recursive=True))
            if not candidates:
                raise PathRefused("NOT_FOUND", f"{what}: {pattern!r} matches no file under the data root")
        else:
            candidates = [self.root / pure]
        resolved = []
        for candidate in candidates:
            real = candidate.resolve()
            if not real.is_relative_to(self.root):
                raise PathRefused("PERMISSION_DENIED", f"{what}: {pattern!r} leads outside the server's data root "
                                                       "(through a symbolic link); refused")
            if not real.is_file():
                raise PathRefused("NOT_FOUND", f"{what}: {pattern!r} is not a file under the server's data root")
            resolved.append(real)
        return resolved
