# expect: failed
# error: EarlyExit
# Exits with status 0 before the tests run: must not count as passed.
import os


def solution():
    return 1


os._exit(0)


def check(candidate):
    assert candidate() == 2


check(solution)
