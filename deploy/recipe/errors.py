"""The one error every stage raises for a problem the user fixes in the recipe.

Its own module, so that engines (which never read a recipe) can raise it too.
"""


class RecipeError(Exception):
    """A problem with a recipe that the user must fix; the message says what to do."""
