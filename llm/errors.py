"""Bad input: one line for the user, a non-zero exit, no stack trace (see llm/cli.py)."""


class UserError(Exception):
  """Something the user can fix: the message says what is wrong and what to do."""
