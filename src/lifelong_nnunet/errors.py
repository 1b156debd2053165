"""Errors that are the user's to fix.

Anything raised as `UserInputError` is shown by the CLI as one paragraph (no traceback) and exits with code 2.
The message must name the offending file or value and say how to fix it.
"""


class UserInputError(Exception):
    """Bad input: a dataset, a spec or a run folder the user has to correct."""


class MethodParamError(UserInputError):
    """A method parameter the spec gives wrongly: an unknown name or a value its declaration does not accept.

    The fields let a caller that knows more about where the value came from (the sweep file) word the fix itself
    with `message`, instead of rewriting this message's text.

    - ``method``: the method's name; ``param``: the parameter as written in the spec;
    - ``value``: the value given (``None`` for an unknown name);
    - ``allowed``: for a bad value, what the parameter accepts in words ("a number >= 0"); for an unknown name, the
      method's parameter names;
    - ``suggestion``: the closest known spelling ("did you mean"), or ``None``.
    """

    def __init__(self, method: str, param: str, value: object, allowed: str | tuple[str, ...],
                 suggestion: str | None = None, unknown: bool = False) -> None:
        self.method, self.param, self.value, self.allowed = method, param, value, allowed
        self.suggestion, self.unknown = suggestion, unknown
        super().__init__(self.message("Fix method_params in the spec."))

    def message(self, fix: str) -> str:
        """The one paragraph for this error, ending with ``fix`` (how to correct it where the user wrote it)."""
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion is not None else ""
        if self.unknown:
            names = ", ".join(self.allowed) or "none"
            return f"method '{self.method}' has no parameter {self.param!r}.{hint} Its parameters are: {names}. {fix}"
        return (f"method '{self.method}': parameter {self.param!r} must be {self.allowed}, not {self.value!r}.{hint} "
                f"{fix}")


class PluginContractError(RuntimeError):
    """A method (plugin) breaks its contract with the runner: a malformed parameter declaration, two methods with one
    name, a replay buffer from a method that does not declare ``keeps_old_data``, a stage with an unknown ``init``.
    A programming error in the method's code, never the user's input."""
