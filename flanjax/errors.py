"""The base class of errors caused by user input (names, configs, shapes, data).

Each says what is wrong and how to fix it, so the command line prints it without a
traceback. Subclasses also derive from the matching built-in type (ValueError, KeyError...).
"""


class FlanjaxError(Exception):
    pass
