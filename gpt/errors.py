"""The one error class for problems a user can fix (a bad setting, file or request).

Library code raises `UserError` about values ("n_head must divide n_embd"), optionally
naming the setting it is about in `field`; the command-line layer (gpt/cli.py) turns that
field into its flag (`--n-head`) and prints the message as one line.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix. The message is one line that says what to do.

    `field` is the config field (`"n_head"`) the message is about, or None. str(e) reads
    "n_head must ..." for a library caller; gpt.cli shows "--n-head must ..." instead.
    `mentions` names other fields the message speaks of ("try n_head 2"); gpt.cli writes
    those as flags too.
    """

    def __init__(self, message: str, field: str | None = None, mentions: tuple[str, ...] = ()):
        super().__init__(message)
        self.message, self.field, self.mentions = message, field, tuple(mentions)

    def __str__(self) -> str:
        return f"{self.field} {self.message}" if self.field else self.message
