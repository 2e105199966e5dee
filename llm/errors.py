"""Bad input: one line for the user, a non-zero exit, no stack trace (see llm/cli.py)."""

import difflib


class UserError(Exception):
  """Something the user can fix: the message says what is wrong and what to do."""


class BadRecord(ValueError):
  """A record that cannot be used (an empty conversation, an unknown role, ...): the reason,
  which the caller names with the record (see prompts.encode_records)."""


def closest(name: str, candidates) -> str | None:
  """The candidate a misspelled `name` most likely meant, or None: for "did you mean"."""
  close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return close[0] if close else None
