"""Bad input: one line for the user, a non-zero exit, no stack trace."""

import functools
import sys


class UserError(Exception):
  """Something the user can fix: the message says what is wrong and what to do."""


def exits_cleanly(main):
  """Wraps an absl `main` so a UserError prints one line and exits with status 2."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
