"""The one exception type for a user's mistake (bad path, malformed manifest, mismatched store...).

Library code raises `InputError` (or a subclass) with a sentence that says what to do; the CLI turns
it into a message and exit code 2 without a traceback. Anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user; the message says what is wrong and what to do."""
