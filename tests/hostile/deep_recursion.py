# expect: failed|memory|signal|timeout
# Recursion with the limit lifted: runs out of stack or memory, never takes the host with it.
import sys

sys.setrecursionlimit(10**9)


def f(n):
    return f(n + 1) + 1


f(0)
