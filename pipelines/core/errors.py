"""The base of every error a user can cause or fix (bad input, missing setting, unreachable service).

The CLI prints these as one clear line on stderr and exits 2; anything else is a bug and keeps its
traceback.
"""


class LeukopsError(Exception):
    pass
