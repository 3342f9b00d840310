"""The one exception type users catch: bad input named by what is wrong with it."""


class EasyQuantError(ValueError):
    """Input easyquant cannot quantize, with a message that names the tensor or file and the problem."""
