#!/usr/bin/env bash
# Run a command and fail if it changed the git working tree (tracked changes or new untracked files).
# On a clean checkout this is exactly `CMD && git diff --exit-code`; with local edits it checks that CMD added none.
set -euo pipefail
state() { { git status --porcelain; git diff; } | sha1sum; }
before=$(state)
"$@" >/dev/null
if [ "$(state)" != "$before" ]; then
  echo "'$*' changed the working tree:" >&2
  git status --short >&2
  echo "The notebooks are the source: run nbdev-clean and nbdev-export, review, and commit the result." >&2
  exit 1
fi
echo "ok: '$(basename "$1")' changed nothing"
