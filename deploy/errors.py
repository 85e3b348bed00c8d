"""The root of every error meant for a user: a sentence that says what to do next.

`python -m deploy` catches `KitError` alone and exits with its `exit_code`, so a script can tell the
failures that matter apart (2 a recipe or model problem, 4 a failed quality gate, 5 a refused
publish, 6 weights refused for want of a passed gate; 1 anything else). Anything that is not a
`KitError` is a bug, and keeps its traceback.

It sits below every stage and imports nothing, so that any stage (engines included, which never
read a recipe) can raise these.
"""


class KitError(Exception):
    """A failure the user can act on; the message says how."""

    exit_code = 1


class RecipeError(KitError):
    """A problem with a recipe that the user must fix; the message says what to do."""

    exit_code = 2
