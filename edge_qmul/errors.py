"""The exceptions edge_qmul raises on bad input."""


class ModelError(ValueError):
    """A model file or Model object is malformed, unsupported or used with the wrong input.

    The message names what was wrong and where (tensor name, op name and index, byte offset).
    """

    #: for a model refused for ops without a kernel: op name -> indices of those ops
    unsupported: dict[str, list[int]] | None = None

    def prefixed(self, where: str) -> "ModelError":
        """The same error with ``where`` (a file name) in front of the message."""
        e = ModelError(f"{where}: {self}")
        e.unsupported = self.unsupported
        return e


class CLIError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 2."""
