"""The exceptions edge_qmul raises on bad input."""


class ModelError(ValueError):
    """A model file or Model object is malformed, unsupported or used with the wrong input.

    The message names what was wrong and where (tensor name, op name and index, byte offset).
    """
